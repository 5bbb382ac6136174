"""scripts/kernel_sass.py: our Triton kernels compiled for Hopper without a GPU. Also a guard on one
property found with it: the one-launch FlashAttention backward at the tinystories-17m shape (d = 32,
packed gradients, its first-choice tiles) compiles without register spills, with and without RoPE."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kernel_sass.py"


@pytest.fixture(scope="module")
def sass():
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("kernel_sass", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("rope", [False, True])
def test_short_backward_compiles_for_sm90_without_spills(sass, rope):
    row = sass.analyse("short", (32, 128, 4, 2), head_dim=32, rope=rope, packed=True)
    assert row["stack"] == 0 and row["local"] == 0, (
        f"{row['stack']} bytes of stack: the kernel spills registers (held tiles inside the query loop?)"
    )
    assert 0 < row["regs"] <= 255
    assert row["loops"], "no loop found in the SASS"
    assert any("HGMMA" in loop["mix"] for loop in row["loops"]), "the loop's dots are not Hopper wgmma"


def test_opcode_and_loop_parsing(sass):
    listing = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_0:",
        *[f"        /*{16 * (i + 1):04x}*/                   FFMA R2, R3, R4, R2 ;" for i in range(9)],
        "        /*00b0*/              @!P0 HGMMA.64x64x16.F32.BF16 gdesc[UR4], R24, gsb0 ;",
        "        /*00c0*/               @P1 BRA `(.L_x_0) ;",
        "        /*00d0*/                   EXIT ;",
    ])
    (loop,) = sass.loops(listing)
    assert loop["instructions"] == 11 and loop["mix"] == {"FFMA": 9, "HGMMA": 1, "BRA": 1}
