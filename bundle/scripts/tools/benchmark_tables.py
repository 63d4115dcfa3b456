"""The benchmark's result tables: the console table of a run and the model card's Markdown table of a saved one."""

from __future__ import annotations

from typing import Any

STAGES = ("key encoding", "memory read", "decode", "value encoding")


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def row_key(r: dict[str, Any]) -> list[str]:
    """The columns that name a configuration."""
    infer = str(r["infer_size"] or "native")
    size = "×".join(map(str, r["size"]))
    return [r["variant"], r.get("runtime", "torch"), size, infer, str(r.get("objects", "-")), r.get("memory", "-")]


KEY_HEADER = ["variant", "runtime", "size", "infer", "objects", "memory"]


def full_to_one(rows: list[dict[str, Any]]) -> dict[tuple, float]:
    """ms per frame with a full memory over ms per frame with only the annotated frame, per configuration."""
    ms = {(*row_key(r)[:5], r["frames"], r["memory"]): r["ms_per_frame"] for r in rows if "error" not in r}
    return {k[:-1]: v / ms[(*k[:-1], "one")] for k, v in ms.items() if k[-1] == "full" and (*k[:-1], "one") in ms}


def print_table(rows: list[dict[str, Any]], profile: bool) -> None:
    """The results as a fixed-width table (and the per-stage table with --profile)."""
    header = [*KEY_HEADER, "frames", "frames/s", "ms/frame", "gen ms/f", "RSS start", "loop peak"]
    header += ["process peak", "cuda peak", "weights"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([*row_key(r), str(r["frames"]), f"failed: {r['error']}"])
            continue
        table.append(
            [*row_key(r), str(r["frames"]), _cell(r["fps"], 2), _cell(r["ms_per_frame"])]
            + [_cell(r["gen_ms_per_frame"]), _cell(r["rss_start_mib"]), _cell(r["loop_peak_rss_mib"])]
            + [_cell(r["process_peak_rss_mib"]), _cell(r["cuda_peak_mib"]), r["weights"]]
        )
    _print_rows(header, table)
    if profile:
        print("\nper-stage time, ms per propagated frame (value encoding runs every --mem-every frames):")
        header = [*KEY_HEADER, "frames", *STAGES, "other"]
        table = [
            [*row_key(r), str(r["frames"])] + [_cell(r["profile_ms_per_frame"][s], 2) for s in (*STAGES, "other")]
            for r in rows
            if "profile_ms_per_frame" in r
        ]
        _print_rows(header, table)
    ratios = full_to_one(rows)
    if ratios:
        print("\ntime per frame with a full memory / with the annotated frame only:")
        _print_rows(
            [*KEY_HEADER[:5], "frames", "full/one"], [[*k[:5], str(k[5]), f"{v:.2f}"] for k, v in ratios.items()]
        )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The model card's table: one row per configuration, frames/s, per-stage ms and the full/one ratio."""
    ratios = full_to_one(rows)
    header = [*KEY_HEADER[:3], "objects", "memory", "frames/s", "ms/frame", *STAGES, "other", "full/one"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "error" in r:
            continue
        key = row_key(r)
        stages = r.get("profile_ms_per_frame", {})
        ratio = ratios.get((*key[:5], r["frames"])) if r.get("memory") == "full" else None
        cells = [*key[:3], key[4], key[5], f"{r['fps']:.1f}", f"{r['ms_per_frame']:.1f}"]
        cells += [f"{stages[s]:.1f}" if s in stages else "-" for s in (*STAGES, "other")]
        cells.append(f"{ratio:.2f}" if ratio is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _print_rows(header: list[str], table: list[list[str]]) -> None:
    full = [row for row in table if len(row) == len(header)]  # failed rows end in one long message
    widths = [max([len(h)] + [len(row[i]) for row in full]) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)) + "".join(f"  {c}" for c in row[len(widths) :]))
