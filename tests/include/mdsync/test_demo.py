"""The engine demo runs its cycles to agreement and records activity."""

from mdsync import demo
from mdsync.state import StateStore


def test_engine_demo_converges(tmp_path, capsys):
    assert demo.main(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "Marketo wins for leads" in out and "Dynamics wins for contacts" in out
    assert out.count("both sides agree on every") == 6 and ": False" not in out
    # cycle 3 only sees our own writes echoed back and must plan none
    cycle3 = out.split("cycle 3:")[1]
    assert "to Dynamics    0 records" in cycle3 and "to Marketo    0 records" in cycle3
    assert len(StateStore(f"sqlite:///{tmp_path / 'state.sqlite'}").activity()) > 0
