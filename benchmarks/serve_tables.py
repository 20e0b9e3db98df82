"""The tables and target lines benchmarks/serve.py prints: every figure as a ratio to the first row (MHA)."""

from __future__ import annotations

from serve_measure import BudgetRow, CacheRow, DecodeRow, Model, gib

from tucker_attention._table import text_table


def ratio(value: float, base: float, digits: int = 3, suffix: str = "") -> str:
    return f"{value / base:.{digits}f}{suffix}" if base else "n/a"


def bandwidth_cells(row: DecodeRow, bandwidth_gbs: float | None) -> list[str]:
    if row.time is None:
        return ["-"] * (3 if bandwidth_gbs else 1)
    achieved = row.bytes_read / row.time.median / 1e9
    cells = [f"{achieved:.1f}"]
    if bandwidth_gbs:
        floor = row.bytes_read / (bandwidth_gbs * 1e9)
        cells += [f"{floor * 1e3:.3f}", f"{100 * achieved / bandwidth_gbs:.0f}%"]
    return cells


def cache_table(rows: list[CacheRow], context: int) -> str:
    base = rows[0].measured
    head = ["method", "cache_spec (layer 0)", "B/token measured", "B/token cache_spec", "ratio",
            f"per sequence @{context}"]
    body = [[r.label, ", ".join(f"{k} {h}x{w}" for k, (h, w) in r.spec.items()), f"{r.measured:,.0f}",
             f"{r.from_spec:,}", ratio(r.measured, base), gib(r.measured * context)] for r in rows]
    return text_table(head, body)


def notes(rows: list[DecodeRow]) -> list[str]:
    lines = [f"  {r.label} @ batch {r.batch}: {r.note}" for r in rows if r.note]
    if len({r.group for r in rows if r.time}) > 1:
        lines.append("  timed in consecutive interleaved groups (--max-cache-gib): ratios across groups are "
                     "not interleaved")
    return lines


def decode_table(rows: list[DecodeRow], bandwidth_gbs: float | None) -> str:
    base = rows[0]
    head = ["method", "batch", "ms/step", "±%", "time ratio", "tokens/s", "tok/s ratio", "MB read/step",
            "floor ratio", "GB/s"] + (["floor ms", "of bw"] if bandwidth_gbs else [])
    body = []
    for r in rows:
        if r.time is None:
            body.append([r.label, str(r.batch), "-", "-", "-", "-", "-", f"{r.bytes_read / 1e6:,.1f}",
                         ratio(r.bytes_read, base.bytes_read), *bandwidth_cells(r, bandwidth_gbs)])
            continue
        t = r.time.median
        body.append([r.label, str(r.batch), f"{t * 1e3:.2f}", f"{100 * r.time.spread:.0f}",
                     ratio(t, base.time.median if base.time else 0), f"{r.tokens_per_s:,.1f}",
                     ratio(r.tokens_per_s, base.tokens_per_s, 2), f"{r.bytes_read / 1e6:,.1f}",
                     ratio(r.bytes_read, base.bytes_read), *bandwidth_cells(r, bandwidth_gbs)])
    return "\n".join([text_table(head, body), *notes(rows)])


def budget_table(rows: list[BudgetRow], bandwidth_gbs: float | None) -> str:
    base = rows[0].decode
    head = ["method", "B/token", "batch", "fits", "ms/step", "tokens/s", "tok/s ratio", "MB read/step",
            "GB/s"] + (["floor ms", "of bw"] if bandwidth_gbs else [])
    body = []
    for r in rows:
        d = r.decode
        timed = d.time is not None
        body.append([r.label, f"{r.bytes_per_token:,.0f}", str(r.fit.batch) + ("*" if r.fit.capped else ""),
                     str(r.fit.fits), f"{d.time.median * 1e3:.2f}" if timed else "-",
                     f"{d.tokens_per_s:,.1f}" if timed else "0", ratio(d.tokens_per_s, base.tokens_per_s, 2),
                     f"{d.bytes_read / 1e6:,.1f}", *bandwidth_cells(d, bandwidth_gbs)])
    return "\n".join([text_table(head, body), *notes([r.decode for r in rows])])


def roles(models: list[Model]) -> dict[str, int]:
    """Indices of the baseline (first row: MHA), the first separate-latent Tucker and the first MLA."""
    found = {"base": 0}
    for i, m in enumerate(models):
        if m.method == "tucker" and not m.shared:
            found.setdefault("tucker", i)
        if m.method == "mla":
            found.setdefault("mla", i)
    return found


def target_lines(models: list[Model], decode: list[DecodeRow], budget: list[BudgetRow]) -> list[str]:
    """The issue's targets (printed, never asserted)."""
    role = roles(models)
    if "tucker" not in role:
        return []
    n, lines = len(models), []
    t, base = role["tucker"], role["base"]
    for c in range(len(budget) // n):
        rows = budget[c * n:(c + 1) * n]
        tok = [r.decode.tokens_per_s for r in rows]
        line = (f"context {rows[0].context}: {rows[t].label} at its memory-limited batch {rows[t].fit.batch}: "
                f"{ratio(tok[t], tok[base], 2, 'x')} MHA's tokens/s at batch {rows[base].fit.batch} (target >= 6)")
        if "mla" in role:
            m = role["mla"]
            line += (f"; {ratio(tok[t], tok[m], 2, 'x')} {rows[m].label}'s at batch {rows[m].fit.batch} "
                     f"({rows[m].bytes_per_token:,.0f} vs {rows[t].bytes_per_token:,.0f} B/token; target >= 1.2)")
        lines.append(line)
    for r in decode:
        if r.batch == 1 and r.label == models[t].label and r.time is not None:
            b = next(x for x in decode if x.batch == 1 and x.context == r.context and x.label == models[base].label)
            if b.time is not None:
                lines.append(f"context {r.context}, batch 1: {r.label} step time "
                             f"{ratio(r.time.median, b.time.median, 3, 'x')} MHA's (target <= 0.15; memory "
                             f"floor ratio {ratio(r.bytes_read, b.bytes_read)})")
    return lines
