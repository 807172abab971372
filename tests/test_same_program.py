"""experiments/same_program: the fingerprint is a function of the program alone."""

import miras_jax as mj
from experiments import same_program


def test_fingerprint_is_stable_and_tells_programs_apart():
    moneta = mj.presets.get("moneta")
    a = same_program.fingerprint(moneta, "xla", 32)
    assert a == same_program.fingerprint(moneta, "xla", 32)             # deterministic
    assert a != same_program.fingerprint(moneta, "xla", 16)             # another chunk: another program
    assert a != same_program.fingerprint(mj.presets.get("yaad"), "xla", 32)
    assert same_program.fingerprint(mj.presets.get("deltaproduct"), "pallas", 32) == "error NotImplementedError"
