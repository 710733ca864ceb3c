"""PNG plots of an ``ailfm bench`` run (needs matplotlib: ``pip install 'ailfmd[bench]'``).

Importing this module raises ImportError without matplotlib; the bench then skips the
plots with a note. The daemon never imports it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ailfmd.lab.bench import summarise  # noqa: E402

BARS = (
    ("mean_response_s", "mean response (s)", "response"),
    ("output_tokens_per_s", "output tokens/s", "tokens_per_s"),
    ("peak_temp_c", "peak temperature (°C)", "peak_temp"),
    ("time_above_dtm_s", "time above DTM (s)", "above_dtm"),
)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


def write_plots(rows: list[dict], traces: list[dict], out_dir: Path) -> list[Path]:
    """Bar charts per chip x workload, and the first seed's temperature traces."""
    written = []
    for (chip, workload), by_policy in summarise(rows).items():
        policies = list(by_policy)
        fig, axes = plt.subplots(1, len(BARS), figsize=(4 * len(BARS), 3.6))
        for ax, (name, label, _) in zip(axes, BARS):
            values = [by_policy[p][name] or 0.0 for p in policies]
            ax.bar(policies, values, color="tab:blue")
            ax.set_title(label, fontsize=10)
            if name == "peak_temp_c" and values:
                ax.set_ylim(bottom=min(values) - 10)  # the differences, not the ambient
            else:
                ax.set_ylim(bottom=0, top=max(max(values, default=0.0) * 1.1, 1e-3))
            ax.tick_params(axis="x", rotation=45, labelsize=8)
        fig.suptitle(f"{chip} / {workload} (mean over seeds)")
        fig.tight_layout()
        path = out_dir / f"metrics_{_slug(chip)}_{_slug(workload)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

        group = [t for t in traces if t["chip"] == chip and t["workload"] == workload]
        if not group:
            continue
        seed = min(t["seed"] for t in group)
        group = [t for t in group if t["seed"] == seed]
        fig, ax = plt.subplots(figsize=(8, 4))
        for t in group:
            ax.plot(t["time_s"], t["max_c"], label=t["policy"], linewidth=1)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("hottest core (°C)")
        ax.set_title(f"{chip} / {workload}, seed {seed}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"trace_{_slug(chip)}_{_slug(workload)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

        fig, axes = plt.subplots(len(group), 1, figsize=(8, 1.2 + 1.0 * len(group)), squeeze=False)
        for ax, t in zip(axes[:, 0], group):
            layer_c = list(zip(*t["layer_max_c"])) if t["layer_max_c"] else [[]]
            span = (t["time_s"][0], t["time_s"][-1]) if t["time_s"] else (0, 1)
            im = ax.imshow(layer_c, aspect="auto", origin="lower", cmap="inferno",
                           extent=(span[0], span[1], -0.5, len(layer_c) - 0.5))
            ax.set_ylabel(t["policy"], fontsize=8)
            fig.colorbar(im, ax=ax, label="°C")
        axes[-1, 0].set_xlabel("time (s); rows: die layer (0 = next to the sink), hottest core")
        fig.tight_layout()
        path = out_dir / f"layers_{_slug(chip)}_{_slug(workload)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
