"""cs336_alignment: grading, rollouts, evaluation, SFT, expert iteration, GRPO, DPO (CS336 assignment 5)."""

__version__ = "0.1.0"
