"""The cache's manifest, verification, replacement and input checks, without Ray.

    python -m pytest tests/unit/test_cache.py -q
"""

from __future__ import annotations

import errno
import hashlib

import pytest

from pipelines import cache


def _attempt(root, key="0123456789abcdef", text="hello"):
    final, tmp, _ = cache.prepare_attempt(root, "stage", key)
    (tmp / "out").mkdir()
    (tmp / "out" / "a.txt").write_text(text)
    (tmp / "out" / "b.bin").write_bytes(b"\0" * 1000)
    return final, tmp


def test_manifest_has_sha256_and_verify_finds_each_kind_of_damage(tmp_path):
    final, tmp = _attempt(tmp_path)
    m = cache.promote(tmp, final, {"key": "0123456789abcdef"}, {})
    files = {f["path"]: f for f in m["files"]}
    assert files["out/a.txt"]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert cache.read_manifest(final)["files"] == m["files"] and not tmp.exists()
    assert cache.verify(final, hashes=True) == []
    (final / "out" / "a.txt").write_text("HELLO")  # same size, other bytes
    assert cache.verify(final) == []
    [p] = cache.verify(final, hashes=True)
    assert "a.txt: expected sha256" in p and "found" in p
    (final / "out" / "b.bin").write_bytes(b"\0" * 10)
    assert any("b.bin: expected 1000 bytes, found 10" in p for p in cache.verify(final))
    (final / "out" / "b.bin").unlink()
    assert any("b.bin: missing" in p for p in cache.verify(final))


def test_forced_replacement_leaves_only_the_new_output(tmp_path):
    final, tmp = _attempt(tmp_path, text="old")
    cache.promote(tmp, final, {"key": "0123456789abcdef"}, {})
    final2, tmp2 = _attempt(tmp_path, text="new")
    assert final2 == final and (final / cache.MANIFEST).exists()  # the old one stays until the new is done
    cache.promote(tmp2, final, {"key": "0123456789abcdef"}, {})
    assert (final / "out" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == [final.name]


def test_recover_finishes_an_interrupted_swap(tmp_path):
    final, tmp = _attempt(tmp_path, text="old")
    cache.promote(tmp, final, {"key": "0123456789abcdef"}, {})
    old = final.with_name(final.name + ".old-1-2")
    final.rename(old)  # crashed after "old aside", before "new in", with no new attempt
    assert "restored" in cache.recover(tmp_path, "stage", final.name)
    assert (final / "out" / "a.txt").read_text() == "old" and not old.exists()


def test_disk_full_error_names_path_and_bytes_and_removes_the_attempt(tmp_path):
    final, tmp = _attempt(tmp_path)
    err = OSError(errno.ENOSPC, "No space left on device", str(tmp / "out" / "c.bin"))
    try:
        raise RuntimeError("writer failed") from err
    except RuntimeError as e:
        out = cache.explain_disk_full(e, tmp)
    assert isinstance(out, cache.DiskFull)
    assert str(tmp / "out" / "c.bin") in str(out) and "had written 1005 bytes" in str(out)
    assert not tmp.exists()
    other = ValueError("bad value")
    assert cache.explain_disk_full(other, tmp_path / "x.tmp") is other


@pytest.mark.parametrize("bad", ["../../etc", "0123456789ABCDEF", "0123456789abcde", "a/b", "", None, 7])
def test_keys_from_outside_are_checked(bad):
    with pytest.raises(ValueError, match="not a cache key"):
        cache.check_key(bad)


@pytest.mark.parametrize("bad", ["runs", "/a/../b", "/a//b", "//host/x", "/a\0b", "", None])
def test_run_roots_from_outside_are_checked(bad):
    with pytest.raises(ValueError):
        cache.check_run_root(bad)
    assert str(cache.check_run_root("/mnt/exp1/runs")) == "/mnt/exp1/runs"


def test_infer_refuses_a_tag_value_that_would_leave_the_run_root(tmp_path):
    from pipelines.infer import ResolveError, _stage_dir

    assert _stage_dir(tmp_path, "train_vpit", "0123456789abcdef") == tmp_path / "train_vpit" / "0123456789abcdef"
    for stage, key in (("train_vpit", "../../../etc"), ("../x", "0123456789abcdef"), ("train_vpit", "/abs")):
        with pytest.raises(ResolveError):
            _stage_dir(tmp_path, stage, key)
