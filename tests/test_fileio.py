"""fileio.write_json_atomic: the whole file or the old one, never a part."""
import json

import pytest

from dopt.formats.fileio import write_json_atomic


def test_unserializable_object_leaves_the_old_file_and_no_temporary(tmp_path):
    dest = tmp_path / "results.json"
    write_json_atomic(dest, {"rows": [1, 2]})
    before = dest.read_bytes()
    with pytest.raises(TypeError):
        write_json_atomic(dest, {"rows": [object()]})
    assert dest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_options_reach_json_dumps_over_the_defaults(tmp_path):
    dest = tmp_path / "r.json"
    write_json_atomic(dest, {"a": [1], "s": "×"})
    assert dest.read_text(encoding="utf-8") == json.dumps(
        {"a": [1], "s": "×"}, indent=2, ensure_ascii=False) + "\n"
    write_json_atomic(dest, {"a": [1], "p": tmp_path}, indent=1, default=str)
    assert dest.read_text(encoding="utf-8") == json.dumps(
        {"a": [1], "p": str(tmp_path)}, indent=1, ensure_ascii=False) + "\n"
