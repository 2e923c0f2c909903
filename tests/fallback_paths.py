"""Which path a backend's op took, asserted around each call: the GPU tests (test_cuda.py)
and the Triton tests read fastfa's fallback record (fastfa.last_fallbacks()) with this.

A test derives the fallbacks it expects from the call itself (dtype, tf32 setting, the GPU's
capability, groups, stride, rule), never from the code under test, so that a call that
falls back where the backend's own kernels should run fails, and so does one that runs them
where it should fall back.
"""

import contextlib

import fastfa


@contextlib.contextmanager
def expect_fallbacks(*expected):
    """The calls in the block fell back exactly as ``expected`` says.

    expected: (op, reason fragment) pairs; each must match its own record of ``op`` whose
    reason contains the fragment, and no record may be left unmatched. None: every call ran
    its backend's own kernels. The record is cleared before and after the block.
    """
    fastfa.clear_fallbacks()
    yield
    records = fastfa.last_fallbacks()
    fastfa.clear_fallbacks()
    check_fallbacks(records, expected)


def check_fallbacks(records, expected):
    unmatched = list(records)
    missing = []
    for op, fragment in expected:
        match = next((record for record in unmatched if record.op == op and fragment in record.reason), None)
        if match is None:
            missing.append((op, fragment))
        else:
            unmatched.remove(match)
    problems = []
    if unmatched:
        problems.append("fell back where the backend's own kernels should have run: "
                        + "; ".join(f"{r.op} ({r.count}x): {r.reason}" for r in unmatched))
    if missing:
        problems.append("no fallback recorded where one was expected (the backend's own kernels ran, or another "
                        "reason was given): " + "; ".join(f"{op}: ...{fragment}..." for op, fragment in missing))
    assert not problems, "\n".join(problems) + f"\nall records: {records}"
