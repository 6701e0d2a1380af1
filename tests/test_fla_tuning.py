"""benchmarks/fla_tuning.py: fla's autotuning results seeded into Triton's cache from a folder, and kept there."""

from benchmarks import fla_tuning


def test_kept_results_seed_the_cache_and_new_ones_are_kept(tmp_path, monkeypatch):
    cache, kept = tmp_path / "cache", tmp_path / "kept"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    (kept / "a1").mkdir(parents=True)
    (kept / "a1" / "chunk_kernel.autotune.json").write_text('{"key": 1}')
    fla_tuning.seed(kept)
    assert (cache / "a1" / "chunk_kernel.autotune.json").read_text() == '{"key": 1}'
    (cache / "b2").mkdir()
    (cache / "b2" / "norm_kernel.autotune.json").write_text("{}")  # tuned in this run
    (cache / "b2" / "norm_kernel.cubin").write_bytes(b"\0")  # compiled code stays in the cache
    fla_tuning.keep(kept)
    assert sorted(path.relative_to(kept).as_posix() for path in kept.rglob("*") if path.is_file()) == [
        "a1/chunk_kernel.autotune.json", "b2/norm_kernel.autotune.json"]


def test_results_are_kept_even_when_the_run_fails(tmp_path, monkeypatch):
    cache, kept = tmp_path / "cache", tmp_path / "kept"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    try:
        with fla_tuning.reused(kept):
            (cache / "c3").mkdir(parents=True)
            (cache / "c3" / "gla_kernel.autotune.json").write_text("{}")
            raise RuntimeError("a baseline broken mid-run")
    except RuntimeError:
        pass
    assert (kept / "c3" / "gla_kernel.autotune.json").exists()
