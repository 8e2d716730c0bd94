"""Results of a benchmark: machine info, JSON dump, markdown tables with ratios, and a log-log plot."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path

from .backends import BACKENDS, OURS, TORCH

LABELS = {"etcd-v2": "etcd-v2 (torch)", "c10d": "c10d (torch)", "etcd_rdzv": "etcd_rdzv", "c10d_rdzv": "c10d_rdzv"}
SCENARIO_TITLES = {
    "join": "Join: N nodes, min = max = N, until every next_rendezvous() returned",
    "rejoin": "Re-rendezvous after one of N nodes dies: N - 1 survivors, min = N - 1, max = N",
    "exit": "Re-rendezvous after one of N nodes exits on SIGTERM: N - 1 survivors, min = N - 1, max = N",
}
SCENARIO_SHORT = {
    "join": "join (min = max = N)",
    "rejoin": "rejoin after a crash (N - 1 survivors)",
    "exit": "rejoin after an exit on SIGTERM (N - 1 survivors)",
}


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import torch

    info = {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        repo = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True)
        info["git"] = rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return info


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def aggregate(runs: list[dict]) -> dict[tuple[str, str, int], dict]:
    """Per (backend, scenario, N): median seconds of the ok trials, or the reason there is none."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["backend"], r["scenario"], r["n"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r["seconds"] for r in rs if r["status"] == "ok"]
        timed_out = [r for r in rs if r["status"] == "timeout"]
        entry = {"trials": len(rs), "ok": len(ok), "cap": max(r["cap"] for r in rs)}
        if timed_out:
            entry["status"] = "timeout"
        elif ok and len(ok) == len([r for r in rs if r["status"] != "skipped"]):
            entry["status"] = "ok"
        elif all(r["status"] == "skipped" for r in rs):
            entry["status"] = "skipped"
        else:
            entry["status"] = "error"
        if ok:
            entry.update(median=statistics.median(ok), min=min(ok), max=max(ok))
        final = [r["phases"][-1] for r in rs if r["status"] == "ok" and r["phases"]]
        if final:
            entry["counters"] = final[0]["counters"]
            entry["core_writes"] = final[0].get("core_writes")
            paid = [f["etcd"] for f in final if f.get("etcd")]
            if paid:  # medians over the trials of what etcd itself paid
                entry["etcd"] = {k: statistics.median(p.get(k, 0) for p in paid) for k in paid[0]}
        entry["note"] = next((r.get("note") or "; ".join(r["errors"][:1]) for r in rs if r["status"] != "ok"), "")
        out[key] = entry
    return out


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "—"
    if entry["status"] == "timeout":
        return f"timed out at cap ({entry['cap']:g} s)"
    if entry["status"] == "skipped":
        return "not run"
    if "median" not in entry:
        return "error"
    text = f"{entry['median']:.2f}"
    if entry["trials"] > 1:
        text += f" ({entry['min']:.2f}–{entry['max']:.2f})"
    return text


def _ratio(torch_entry: dict | None, ours_entry: dict | None) -> str:
    if not ours_entry or "median" not in ours_entry or not torch_entry:
        return "—"
    if torch_entry["status"] == "timeout":
        return f"> {torch_entry['cap'] / ours_entry['median']:.1f}×"
    if "median" not in torch_entry:
        return "—"
    return f"{torch_entry['median'] / ours_entry['median']:.1f}×"


def _kb(nbytes: int | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 1024:.1f}"


def markdown(doc: dict) -> str:
    runs = doc["runs"]
    agg = aggregate(runs)
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in runs)]
    ours = [b for b in OURS if b in backends]
    torch_ = [b for b in TORCH if b in backends]
    pairs = [(t, o) for o in ours for t in torch_]
    m, s = doc["machine"], doc["settings"]
    lines = [
        f"# Rendezvous benchmark `{doc['name']}`",
        "",
        f"{m['cpu_count']} CPUs ({m['cpu_model']}), {m.get('memory_gib')} GiB, Python {m['python']}, "
        f"torch {m['torch']}, etcd {doc.get('etcd_version', '?')}, repo {m.get('git', '?')}, {doc['created']}.",
        "",
        f"Nodes are threads in {s['procs']} process(es) on one machine, all on loopback. Caps: ours "
        f"{s['cap']:g} s, torch's {s['torch_cap']:g} s per phase; {s['repeat']} trial(s) per point "
        "(median, with min–max when more than one). Ratios are torch's time / ours (higher is better for ours); "
        "\"> x×\" means torch's backend hit the cap.",
        "",
    ]
    for scenario in doc["settings"]["scenarios"]:
        ns = sorted({r["n"] for r in runs if r["scenario"] == scenario})
        if not ns:
            continue
        lines += [f"## {SCENARIO_TITLES.get(scenario, scenario)}", "", "Seconds:", ""]
        head = ["N"] + [LABELS[b] for b in backends] + [f"{t} / {o}" for t, o in pairs]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for n in ns:
            row = [str(n)] + [_cell(agg.get((b, scenario, n))) for b in backends]
            row += [_ratio(agg.get((t, scenario, n)), agg.get((o, scenario, n))) for t, o in pairs]
            lines.append("| " + " | ".join(row) + " |")
        if scenario == "rejoin":
            lines += ["", "The leaver crashes: its keep-alives stop and nothing else. The figure includes noticing "
                      f"the dead node (keep-alive {s['keep_alive']:g} s × {s['keep_alive_attempts']} attempts) and "
                      f"the last call wait ({s['last_call']:g} s).", ""]
        if scenario == "exit":
            hooked = [LABELS[b] for b in backends if any(
                r["backend"] == b and r["scenario"] == "exit" and r["phases"] and r["phases"][-1].get("leaver_exit_hook")
                for r in runs)]
            lines += ["", "The leaver exits the way a process does on SIGTERM under torchrun (no `shutdown()`): its "
                      "keep-alives stop and whatever the handler registered for interpreter exit runs. Ours ends "
                      "the node's liveness there (`weakref.finalize`, `handler._abandoned`), so survivors need "
                      "not wait for the heartbeat timeout; torch's handlers register nothing, so for them this is "
                      "the same as `rejoin` (the departed node stays until keep-alive "
                      f"{s['keep_alive']:g} s × {s['keep_alive_attempts']} attempts have passed). The figure is "
                      "timed from the common start, at which the leaver exits, and includes the last call wait "
                      f"({s['last_call']:g} s). Exit hook ran for: {', '.join(hooked) or 'none'}.", ""]
        lines += ["", "Writes to the backend during the timed phase, per rendezvous (all nodes together):", "",
                  "| N | backend | set_state calls (won) | state KB written | mailbox posts | mailbox KB | "
                  "liveness beats | get_state calls | core CAS writes | requests per node | "
                  "etcd raft entries per node | etcd CPU s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in ns:
            for b in backends:
                e = agg.get((b, scenario, n))
                if not e or "counters" not in e:
                    continue
                c = e["counters"]
                lines.append(
                    f"| {n} | {LABELS[b]} | {c.get('set_state_calls', 0)} ({c.get('set_state_won', 0)}) | "
                    f"{_kb(c.get('set_state_bytes', 0))} | {c.get('mailbox_posts', '—')} | {_kb(c.get('mailbox_bytes'))} | "
                    f"{c.get('liveness_beats', '—')} | {c.get('get_state_calls', 0)} | {e.get('core_writes') or '—'} | "
                    f"{_per_node(c.get('requests'), n)} | {_per_node(e.get('etcd', {}).get('raft_entries'), n)} | "
                    f"{_seconds(e.get('etcd', {}).get('cpu_seconds'))} |"
                )
        lines.append("")
    notes = list(doc.get("notes", []))
    for (b, scenario, n), e in sorted(agg.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        if e["status"] not in ("ok", "skipped") and e["note"]:
            notes.append(f"{b} {scenario} N={n}: {e['status']}: {e['note']}")
    if notes:
        lines += ["## Notes", ""] + [f"- {x}" for x in notes] + [""]
    return "\n".join(lines)


def _per_node(count: float | None, n: int) -> str:
    return "—" if count is None else f"{count / n:.1f}"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def write_markdown(path: Path, doc: dict) -> None:
    path.write_text(markdown(doc))


# Each backend its own marker and line style, so that lines lying on each other stay apart (ours
# solid with filled markers, torch's broken with hollow ones), and its points shifted a little
# along N so that equal times do not hide each other.
STYLES = {
    "etcd_rdzv": dict(marker="o", linestyle="-", fill=True),
    "c10d_rdzv": dict(marker="s", linestyle="--", fill=True),
    "etcd-v2": dict(marker="^", linestyle=":", fill=False),
    "c10d": dict(marker="D", linestyle="-.", fill=False),
}
DODGE = 0.045  # of an octave of N, per backend


def _dodged(n: int, index: int, count: int) -> float:
    return n * 2 ** (DODGE * (index - (count - 1) / 2))


def write_plot(path: Path, doc: dict) -> str | None:
    """Time vs N, log-log, one line per backend and a panel per scenario; points that hit the cap
    are marked x at the cap, points that failed with no time ▼ at the panel's foot. Returns why
    not, if not: a scenario measured at one N only gets no plot (its table says it all)."""
    agg = aggregate(doc["runs"])
    scenarios = [sc for sc in doc["settings"]["scenarios"] if len({k[2] for k in agg if k[1] == sc}) > 1]
    if not scenarios:
        return "no plot: no scenario was measured at more than one N"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        return f"no plot: {e} (pip install matplotlib)"
    fig, axes = plt.subplots(1, len(scenarios), figsize=(max(7.5, 6.0 * len(scenarios)), 6.0), squeeze=False)
    backends = [b for b in BACKENDS if any(k[0] == b for k in agg)]
    for ax, scenario in zip(axes[0], scenarios):
        failed_marks = []
        for i, b in enumerate(backends):
            points = sorted((k[2], e) for k, e in agg.items() if k[0] == b and k[1] == scenario)
            ok = [(_dodged(n, i, len(backends)), e["median"]) for n, e in points if "median" in e and e["status"] == "ok"]
            capped = [(_dodged(n, i, len(backends)), e["cap"]) for n, e in points if e["status"] == "timeout"]
            failed = [_dodged(n, i, len(backends)) for n, e in points if e["status"] == "error"]
            if not ok and not capped and not failed:
                continue
            style = STYLES.get(b, dict(marker="o", linestyle="-", fill=True))
            line = ax.plot([n for n, _ in ok], [t for _, t in ok], linestyle=style["linestyle"], marker=style["marker"],
                           markersize=7, linewidth=1.8, label=LABELS[b])[0]
            color = line.get_color()
            if not style["fill"]:
                line.set_markerfacecolor("white")
            if capped:
                ax.plot([n for n, _ in capped], [t for _, t in capped], linestyle="none", marker="x",
                        markersize=11, markeredgewidth=2.2, color=color, label=f"{LABELS[b]}: timed out at cap")
                if ok:  # join the last finished point to the cap marker
                    ax.plot([ok[-1][0], capped[0][0]], [ok[-1][1], capped[0][1]], ":", color=color)
            if failed:
                failed_marks.append((failed, color, LABELS[b]))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # Whole decades with plain 1-2-5 labels: readable even when the points span a narrow range.
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if ys:
            ax.set_ylim(10 ** math.floor(math.log10(min(ys) * 0.8)), 10 ** math.ceil(math.log10(max(ys) * 1.25)))
        for xs, color, label in failed_marks:
            # A failed point has no time: marked at the panel's foot, in axes coordinates along y.
            ax.plot(xs, [0.03] * len(xs), linestyle="none", marker="v", markersize=11, color=color,
                    transform=ax.get_xaxis_transform(), clip_on=False, label=f"{label}: failed (no time)")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ns = sorted({k[2] for k in agg if k[1] == scenario})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlim(ns[0] / 2 ** 0.35, ns[-1] * 2 ** 0.35)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("nodes N")
        ax.set_ylabel("seconds until all returned")
        ax.set_title(SCENARIO_SHORT.get(scenario, scenario), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    # One legend for all panels, below them, where it covers no point.
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)), fontsize=8.5,
               frameon=False)
    m, st = doc["machine"], doc["settings"]
    fig.suptitle(f"Rendezvous time vs N ({doc['name']}), median of {st['repeat']} trial(s); "
                 "x = timed out at cap, ▼ = failed\n"
                 f"{m['cpu_count']} CPUs ({m['cpu_model'] or '?'}), {m.get('memory_gib')} GiB, torch {m['torch']}, "
                 f"nodes as threads in {st['procs']} process(es), code {m.get('git', '?')}", fontsize=10)
    rows = math.ceil(len(handles) / min(4, len(handles)))
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report RESULT.json...``: write each result's ``.md`` and ``.png`` again
    from its JSON (after a change to the report, or to the files' names)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results/<name>.json")
    args = parser.parse_args(argv)
    for path in args.results:
        doc = json.loads(path.read_text())
        write_markdown(path.with_suffix(".md"), doc)
        problem = write_plot(path.with_suffix(".png"), doc)
        if problem is not None:
            path.with_suffix(".png").unlink(missing_ok=True)
        print(f"{path.with_suffix('.md')}" + (f"; {problem}" if problem else f", {path.with_suffix('.png')}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
