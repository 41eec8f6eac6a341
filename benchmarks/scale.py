"""The DensityEstimator beyond one process (issue 25): rows per second of ``fit`` for one and two
processes on the CPU, and peak memory when the data is a memory-mapped file 10 times larger
than a memory budget.

Run from the repository root (about 10 minutes with the defaults on two quiet cores; one with
``--smoke``)::

    python -m benchmarks.scale --out benchmarks/results/scale.md

**Throughput.** A D = 64 MAF (5 layers, hidden (256, 256), float32) fitted by
``DensityEstimator.fit`` to a memory-mapped ``.npy`` (``ArrayDataset``) for ``--epochs``
epochs at each global batch of ``--batch-sizes`` (default 512 to 4096); rows per second is
``history_["rows_per_second"]`` (all ranks' training rows over the epoch's training time,
validation excluded), the median over the epochs after the first. Configurations, each in
fresh processes and interleaved over ``--repeats`` rounds (the batch sizes inside each round):
one process with one thread, with ``--two-threads`` one process with two threads (the other
way to spend two cores), and two processes of one thread each in a gloo group
(``torch.multiprocessing`` spawn), every rank reading its half of each global batch. Reported
per global batch: the two processes' rows per second over the one process's at the same
global batch (the same training: the same steps), and, as data-parallel training is usually
grown (each rank keeping its batch, the global batch doubling), the two processes at global
batch 2B over one process at B. The CPU seconds of each fit (all processes and their threads,
``time.process_time``) tell the work from the waiting: on a machine whose cores others share,
a rank waits at every step's all-reduce for the other, descheduled one, which costs wall time
but no CPU time.

**Memory.** One process fits a small MAF (1 layer, hidden (64,), batch 4096, one epoch) to
memory-mapped files of 1 and 10 times ``--budget-mb``; a thread samples ``/proc/self/status``
every 5 ms. Reported: the peak of ``RssAnon`` (the process's own memory: tensors, heap) above
its value just before ``fit`` (after a warm-up fit on the small validation file: lazy imports,
the allocator's pools and the kernels' first calls are not the data's), and the peak of
``VmRSS``, which also counts the file's pages the kernel keeps mapped (page cache, given back
under memory pressure). The goal is about the first: it must stay under the budget and not grow
with the file.

**SVI on a subsampled plate** (``--svi``). A logistic regression (D = 5) whose data plate
of N rows is subsampled to B = 256 a step, trained by an ``AutoIAF`` guide with ``FlowELBO``
(8 vectorized particles; its loss module, as ``examples/ddp_svi.py`` trains): the
milliseconds a step at N = 256 (the whole plate), and at
N = 10^6 with the plate drawing its subsample (``subsample_size=B``) and with the model given
the step's B row numbers (``subsample=``, drawn by ``torch.randint``). The guide's work does
not depend on N; Pyro's plate draws ``subsample_size`` rows as ``torch.randperm(N)[:B]``, O(N)
a step, which passing ``subsample=`` avoids.

The machine's load average (other users included) is printed beside the numbers: on a shared
machine the ratios, measured in one interleaved run, are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks import emit

D = 64
MODEL = {"flow": "maf", "num_layers": 5, "hidden_dims": (256, 256), "seed": 0,
         "dtype": torch.float32}
SMALL = {"flow": "maf", "num_layers": 1, "hidden_dims": (64,), "seed": 0, "dtype": torch.float32}


def write_rows(path: str, n: int, seed: int) -> None:
    """``n`` rows of a correlated, curved 64-D distribution to a ``.npy`` (float32), written a
    chunk at a time through a memory map (the file is never in memory whole)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((D, D)).astype(np.float32) / np.sqrt(D)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D))
    for start in range(0, n, 65536):
        z = rng.standard_normal((min(65536, n - start), D)).astype(np.float32)
        z[:, 1::2] += 0.5 * z[:, 0::2] ** 2
        out[start:start + z.shape[0]] = z @ mix
    out.flush()
    del out


def _status() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # MiB
    return fields


def _fit(options: dict, train: str, val: str, **fit) -> dict:
    from pyroflows.density import DensityEstimator
    from pyroflows.density.streaming import ArrayDataset

    est = DensityEstimator(**options)
    est.fit(ArrayDataset(np.load(train, mmap_mode="r")),
            x_val=ArrayDataset(np.load(val, mmap_mode="r")), progress=False, **fit)
    return est.history_


def _throughput_rank(rank: int, world: int, init: str, threads: int, train: str, val: str,
                     epochs: int, batch: int, out: str) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                                world_size=world)
    torch.set_num_threads(threads)
    cpu = time.process_time()
    try:
        history = _fit(MODEL, train, val, max_epochs=epochs, batch_size=batch, patience=10**6)
    finally:
        if world > 1:
            dist.destroy_process_group()
    with open(f"{out}.cpu{rank}", "w") as f:
        json.dump(time.process_time() - cpu, f)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(history["rows_per_second"], f)


def throughput(processes: int, threads: int, train: str, val: str, epochs: int, batch: int,
               folder: str) -> tuple[float, float]:
    """Median rows per second over the epochs after the first, in fresh processes, and the
    CPU seconds of the whole fit summed over the processes (their threads included)."""
    out = os.path.join(folder, "rate.json")
    init = os.path.join(folder, f"init-{time.monotonic_ns()}")
    mp.spawn(_throughput_rank, args=(processes, init, threads, train, val, epochs, batch, out),
             nprocs=processes, join=True)
    with open(out) as f:
        rates = json.load(f)
    cpu = 0.0
    for rank in range(processes):
        with open(f"{out}.cpu{rank}") as f:
            cpu += json.load(f)
    return statistics.median(rates[1:] if len(rates) > 1 else rates), cpu


def _memory_child(rank: int, train: str, val: str, out: str) -> None:
    torch.set_num_threads(1)
    import pyroflows.density.streaming  # noqa: F401 - imported before the baseline

    peak = {"RssAnon": 0.0, "VmRSS": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = _status()
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.005)

    _fit(SMALL, val, val, max_epochs=1, batch_size=4096, patience=10)  # warm up: lazy imports,
    before = _status()  # the allocator's pools, the kernels' first calls
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tick = time.perf_counter()
    history = _fit(SMALL, train, val, max_epochs=1, batch_size=4096, patience=10)
    seconds = time.perf_counter() - tick
    done.set()
    sampler.join()
    with open(out, "w") as f:
        json.dump({"before": before, "peak": peak, "seconds": seconds,
                   "rows_per_second": history["rows_per_second"][0]}, f)


def memory(train: str, val: str, folder: str) -> dict:
    out = os.path.join(folder, "memory.json")
    mp.spawn(_memory_child, args=(train, val, out), nprocs=1, join=True)
    with open(out) as f:
        return json.load(f)


def profile(batch: int, reps: int = 20) -> list[str]:
    """The CPU milliseconds (``time.process_time``, one thread: what the load of others does
    not change) of one training step of the throughput model on ``batch`` rows and on half of
    them, and of the parts a data-parallel step adds or repeats on every rank."""
    from pyroflows.density import DensityEstimator
    from pyroflows.density.training import training_state, training_step

    torch.set_num_threads(1)
    est = DensityEstimator(**MODEL).fit(torch.randn(2048, D), max_epochs=0, progress=False)
    model = est._model
    optimizer, params, average = training_state(model, 1e-3, 0.0, 0.01)
    u = torch.randn(batch, D)

    def cpu_ms(fn) -> float:
        fn()
        fn()
        tick = time.process_time()
        for _ in range(reps):
            fn()
        return (time.process_time() - tick) / reps * 1000

    def reduce_parts() -> None:  # parallel_step's own work, less the collective itself
        flat = torch.cat([p.grad.reshape(-1) for p in params]) / 2.0
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    full = cpu_ms(lambda: training_step(model, u, optimizer, params, average))
    half = cpu_ms(lambda: training_step(model, u[:batch // 2], optimizer, params, average))
    adam = cpu_ms(optimizer.step)
    flat = cpu_ms(reduce_parts)
    bound = full / (half + flat)
    return [f"| {batch} | {full:.1f} | {half:.1f} | {adam:.1f} | {flat:.1f} | {bound:.2f}x |"]


def _subsampled_regression(x: torch.Tensor, y: torch.Tensor, batch) -> None:
    """w ~ N(0, I), y_i ~ Bernoulli(sigmoid(x_i w)) on a subsample of the rows: ``batch`` an
    int (the plate draws that many) or a tensor of row numbers (the plate takes them)."""
    import pyro
    import pyro.distributions as pdist

    w = pyro.sample("w", pdist.Normal(x.new_zeros(x.shape[1]), 1.0).to_event(1))
    plate = (pyro.plate("data", x.shape[0], subsample=batch) if torch.is_tensor(batch)
             else pyro.plate("data", x.shape[0], subsample_size=batch))
    with plate as idx:
        pyro.sample("y", pdist.Bernoulli(logits=(x[idx] * w).sum(-1)), obs=y[idx])


def svi_subsample(steps: int = 100, batch: int = 256, rounds: int = 3) -> list[str]:
    """Milliseconds a training step (``AutoIAF``; the loss module of ``FlowELBO`` with 8
    vectorized particles, as ``examples/ddp_svi.py`` trains, and Adam at the guide's
    ``param_groups``) on :func:`_subsampled_regression`: the whole plate of ``batch`` rows,
    then 10^6 rows subsampled by the plate and by the caller; the median of ``rounds``
    interleaved rounds of ``steps`` steps."""
    import pyro

    import pyroflows as pf

    torch.set_num_threads(1)
    cases = []
    for n, how in ((batch, "none (the whole plate)"), (10**6, "subsample_size=B"),
                   (10**6, "subsample=row numbers")):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 5, generator=g)
        y = torch.bernoulli(torch.sigmoid(x @ torch.linspace(-1, 1, 5)), generator=g)
        fixed = batch if n > batch else None  # the plate draws B rows, or takes all of them
        draw = ((lambda n=n: torch.randint(n, (batch,))) if how.startswith("subsample=")
                else (lambda fixed=fixed: fixed))
        pyro.set_rng_seed(0)
        guide = pf.guides.AutoIAF(_subsampled_regression)
        guide(x, y, draw())
        optimizer = torch.optim.Adam(guide.param_groups())
        loss = pf.guides.FlowELBO(num_particles=8, vectorize_particles=True)(
            _subsampled_regression, guide)
        cases.append((n, how, x, y, draw, loss, optimizer, []))

    def step(x, y, draw, loss, optimizer) -> None:
        optimizer.zero_grad()
        loss(x, y, draw()).backward()
        optimizer.step()

    for _ in range(rounds):
        for _n, _how, x, y, draw, loss, optimizer, times in cases:
            for _ in range(5):
                step(x, y, draw, loss, optimizer)
            tick = time.perf_counter()
            for _ in range(steps):
                step(x, y, draw, loss, optimizer)
            times.append((time.perf_counter() - tick) / steps * 1000)
    lines = ["| rows N | subsample | ms a step (median) | rounds | vs the whole plate of B rows |",
             "|---:|---|---:|---|---:|"]
    base = statistics.median(cases[0][-1])
    for n, how, *_, times in cases:
        ms = statistics.median(times)
        lines.append(f"| {n} | {how} | {ms:.1f} | {', '.join(f'{t:.1f}' for t in times)} | "
                     f"{ms / base:.2f}x |")
    return lines + [""]


def throughput_table(batches: list[int], configs: list[tuple[int, int]], rates: dict,
                     cpus: dict) -> list[str]:
    """The throughput runs as Markdown: a row per global batch and configuration, then the
    verdicts (the goal: two processes at 1.7x the rows per second of one or more)."""
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    lines = ["| global batch | processes x threads | rows/s (median) | runs | vs 1 x 1, same "
             "global batch | CPU s per fit (all processes) | CPU s vs 1 x 1 |",
             "|---:|---|---:|---|---:|---:|---:|"]
    for batch in batches:
        one = ((1, 1), batch)
        for config in configs:
            key = (config, batch)
            lines.append(f"| {batch} | {config[0]} x {config[1]} | {med[key]:.0f} | "
                         f"{', '.join(f'{r:.0f}' for r in rates[key])} | "
                         f"{med[key] / med[one]:.2f}x | {cpu[key]:.1f} | "
                         f"{cpu[key] / cpu[one]:.2f}x |")
    lines += ["", "Two processes against one (goal >= 1.7x):", ""]
    for batch in batches:
        ratio = med[((2, 1), batch)] / med[((1, 1), batch)]
        line = (f"- global batch {batch} ({batch // 2} rows a rank): {ratio:.2f}x the rows/s of "
                f"one process at the same global batch ({'met' if ratio >= 1.7 else 'not met'}"
                f"; scaling efficiency {ratio / 2:.0%})")
        if batch % 2 == 0 and batch // 2 in batches:
            grown = med[((2, 1), batch)] / med[((1, 1), batch // 2)]
            line += (f"; {grown:.2f}x one process at global batch {batch // 2}, each rank "
                     f"keeping that batch ({'met' if grown >= 1.7 else 'not met'})")
        lines.append(line + ".")
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16384, help="training rows (throughput)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per throughput run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096],
                        help="the global batches (throughput)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--budget-mb", type=float, default=32.0,
                        help="the memory budget; the large file is 10x it")
    parser.add_argument("--two-threads", action="store_true",
                        help="also one process with two threads (slow where others share the "
                        "cores: contended threads spin)")
    parser.add_argument("--factors", type=float, nargs="+", default=[1, 10],
                        help="the memory files' sizes in budgets (the goal compares 1 and 10)")
    parser.add_argument("--memory-only", action="store_true", help="skip the throughput part")
    parser.add_argument("--svi", action="store_true",
                        help="only SVI's step time on a subsampled plate")
    parser.add_argument("--profile", type=int, nargs="*", metavar="BATCH",
                        help="only the CPU cost of a step at these global batch sizes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check it runs")
    parser.add_argument("--out", help="write the Markdown table here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.epochs, args.repeats, args.budget_mb = 2048, 2, 1, 2.0
        args.batch_sizes = [256, 512]
    if args.profile:
        lines = ["| global batch | step, all rows (CPU ms) | step, half the rows | Adam step | "
                 "flatten and split the gradients | 2 processes at most (no waiting, free "
                 "all-reduce) |", "|---:|---:|---:|---:|---:|---:|"]
        for batch in args.profile:
            lines += profile(batch)
        print("\n".join(lines))
        return
    if args.svi:
        print("\n".join(svi_subsample(steps=20 if args.smoke else 100)))
        return
    load_before = os.getloadavg()
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        train, val = os.path.join(folder, "train.npy"), os.path.join(folder, "val.npy")
        write_rows(train, args.rows, 0)
        write_rows(val, 2048, 1)
        configs = [(1, 1), (1, 2), (2, 1)] if args.two_threads else [(1, 1), (2, 1)]
        if args.memory_only:
            configs = []
        runs = [(c, b) for b in args.batch_sizes for c in configs]
        rates: dict = {r: [] for r in runs}
        cpus: dict = {r: [] for r in runs}
        for _ in range(args.repeats):
            for (processes, threads), batch in runs:
                rate, cpu = throughput(processes, threads, train, val, args.epochs, batch,
                                       folder)
                rates[((processes, threads), batch)].append(rate)
                cpus[((processes, threads), batch)].append(cpu)
                print(f"batch {batch}, {processes} process(es) x {threads} thread(s): "
                      f"{rate:.0f} rows/s, {cpu:.1f} CPU s", flush=True)
        if configs:
            lines += throughput_table(args.batch_sizes, configs, rates, cpus)
        rows_per_mb = 1024 * 1024 / (D * 4)
        lines += ["| file (MiB) | x budget | rows | peak RssAnon above start (MiB) | "
                  "peak VmRSS (MiB) | fit s | rows/s |", "|---:|---:|---:|---:|---:|---:|---:|"]
        grown = []
        for factor in args.factors:
            n = int(factor * args.budget_mb * rows_per_mb)
            path = os.path.join(folder, f"big{factor:g}.npy")
            write_rows(path, n, 2)
            result = memory(path, val, folder)
            anon = result["peak"]["RssAnon"] - result["before"]["RssAnon"]
            grown.append(anon)
            lines.append(f"| {os.path.getsize(path) / 2**20:.0f} | {factor:g} | {n} | "
                         f"{anon:.1f} | {result['peak']['VmRSS']:.0f} | "
                         f"{result['seconds']:.1f} | {result['rows_per_second']:.0f} |")
            os.remove(path)
        ok = max(grown) < args.budget_mb and max(grown) < 1.5 * min(grown) + 2
        verdict = "under the budget and independent of the file size: met" if ok else "not met"
        lines += ["", f"Budget {args.budget_mb:g} MiB: the fit's own memory grew by "
                  + ", ".join(f"{g:.1f} MiB ({f:g}x)" for g, f in zip(grown, args.factors,
                                                                     strict=True))
                  + f" ({verdict})."]
    load_after = os.getloadavg()
    header = [
        "Command: `python -m benchmarks.scale" + (" " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])).rstrip() + "`",
        "",
        f"torch {torch.__version__}, {os.cpu_count()} cores; load average (1, 5, 15 min) before "
        f"{', '.join(f'{v:.2f}' for v in load_before)}, after "
        f"{', '.join(f'{v:.2f}' for v in load_after)}.",
        "",
    ]
    emit(header + lines, args.out)


if __name__ == "__main__":
    main()
