import json
import os
from pathlib import Path

import pytest

from liveupdate import jsonfile


def test_a_file_is_replaced_whole_and_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    jsonfile.dump(str(p), {"a": 1})
    jsonfile.dump(str(p), {"a": 2}, indent=2)
    assert json.loads(p.read_text()) == {"a": 2} and os.listdir(tmp_path) == ["state.json"]
    with pytest.raises(TypeError):  # not JSON: the old file stays, no temporary remains
        jsonfile.dump(str(p), {"a": object()})
    assert json.loads(p.read_text()) == {"a": 2} and os.listdir(tmp_path) == ["state.json"]
    with pytest.raises(OSError):
        jsonfile.dump(str(tmp_path / "missing" / "x.json"), {})
