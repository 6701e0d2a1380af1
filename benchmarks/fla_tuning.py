"""fla's autotuning, kept between runs, so that fla can be timed beside us within one device command.

fla autotunes each of its Triton kernels over up to 24 launch configurations on first use: minutes per model or
shape, which kept fla out of our benchmark runs (its numbers came from earlier runs). fla asks Triton to keep each
kernel's timings as `<cache>/<key>/<kernel>.autotune.json`; the key hashes the Triton version, the GPU
architecture, the kernel's source and the tuning key, so the same image on the same kind of GPU finds them again.
`seed(folder)` copies the files an earlier run left in `folder` into Triton's cache, so fla takes the
configuration it chose then without timing the others (it still compiles the ones it uses); `keep(folder)` copies
the cache's files back, this run's new ones too: call it after each fla contender, so that a run cut short keeps
what it tuned (`reused` does both around one fla run). Run on the GPU with a folder under $OUT, and commit what
comes back:

    mkdir -p benchmarks/fla-tuning && cp -r benchmarks/fla-tuning $OUT/ && \
        python benchmarks/scan.py --fla-tuning $OUT/fla-tuning ...
"""

import shutil
from contextlib import contextmanager
from pathlib import Path

import triton

PATTERN = "*/*.autotune.json"


def seed(folder: str | Path) -> None:
    """Triton's cache gets the autotuning results kept in `folder`."""
    _copy_results(Path(folder), Path(triton.knobs.cache.dir))


def keep(folder: str | Path) -> None:
    """`folder` gets every autotuning result in Triton's cache."""
    _copy_results(Path(triton.knobs.cache.dir), Path(folder))


@contextmanager
def reused(folder: str | Path):
    """Within: fla finds the results kept in `folder`. After, whatever happened: `folder` keeps the cache's."""
    seed(folder)
    try:
        yield
    finally:
        keep(folder)


def _copy_results(source: Path, target: Path) -> None:
    for file in source.glob(PATTERN):
        destination = target / file.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, destination)
