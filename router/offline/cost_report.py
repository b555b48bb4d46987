"""`router report cost`: finance's cost per delivered message, from a decision log folder.

Every decision in the period (by its decision time, UTC) is one message; its spend is the sum of
the costs on its outcome events, as the engine logged them (the carrier's billing basis is already
applied there: billed on an accepted submit, or on a `DELIVRD` receipt). Spend therefore counts
late receipts of a message sent in the period, and the report's total spend equals the sum of the
outcome log's `cost` column over the period's decisions. Writes CSV, Parquet and an HTML page.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from router.console import report_console
from router.core.config import DEFAULT_POLICY_FILE, load_config
from router.log.decision_log import (
    DECISION_SCHEMA,
    DECISIONS,
    OUTCOME_SCHEMA,
    OUTCOMES,
    finalized_view,
    read_stream,
)

GROUP_COLUMNS = ("carrier", "country", "operator", "tenant", "message_class", "day")
DEFAULT_BY = ("carrier", "country", "day")
REPORT_NAME = "cost_report"

# Plain-language meaning of each column, shown on the HTML page.
COLUMN_HELP = {
    "carrier": "The carrier (route) the message was sent through.",
    "country": "Destination country of the message.",
    "operator": "Destination mobile operator.",
    "tenant": "The client (tenant) that sent the message.",
    "message_class": "Kind of message: otp (one-time codes), transactional or marketing.",
    "day": "UTC date on which the message was sent.",
    "messages": "Messages sent (each retry counts as a message of its own).",
    "parts": "Message parts sent (a long SMS is split into parts; carriers price each part).",
    "spend": "What carriers charged for these messages. Some carriers charge when the message "
    "is accepted, others only when it is delivered, so undelivered messages may cost nothing.",
    "delivered": "Messages the carrier reported as delivered to the phone.",
    "delivered_within_sla": "Delivered messages that arrived in time for their purpose "
    "(for example, a one-time code within 60 seconds).",
    "cost_per_delivered": "Spend divided by delivered messages: what one delivered message "
    "really costs. Shown as – when nothing was delivered.",
    "retries_share_of_spend": "Part of the spend that went to retries (second and later "
    "attempts after a failed send).",
    "previous_spend": "Spend of the same group in the previous period of the same length.",
    "spend_change_pct": "Change of spend against the previous period, in percent.",
    "previous_cost_per_delivered": "Cost per delivered message in the previous period.",
    "cost_per_delivered_change_pct": "Change of cost per delivered message against the "
    "previous period, in percent (negative is cheaper).",
}


@dataclass
class CostReportOptions:
    """What `router report cost` is run with."""

    logs: Path
    start: datetime | None = None
    end: datetime | None = None
    by: Sequence[str] = DEFAULT_BY
    out: Path = Path("data/reports")
    policy_file: Path | None = None
    top: int = 15


@dataclass
class CostReport:
    """The report table, its totals and what it covers."""

    table: pd.DataFrame
    totals: dict[str, float]
    view: pd.DataFrame  # one row per decision of the period (finalized view)
    by: tuple[str, ...]
    start: datetime | None
    end: datetime | None
    currency: str
    paths: dict[str, Path] | None = None

    @property
    def period(self) -> str:
        """The period in words, e.g. `2025-01-01 00:00 to 2025-01-02 00:00 UTC`."""
        return period_label(self.start, self.end, self.view)


def parse_when(text: str, option: str = "date") -> datetime:
    """A UTC date or date-time (`2025-01-31`, `2025-01-31T12:00`, with an optional offset)."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{option}: {text!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_by(text: str | Sequence[str]) -> tuple[str, ...]:
    """The grouping columns from `carrier,country,...`; unknown or empty names are errors."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"--by: give at least one of {', '.join(GROUP_COLUMNS)}")
    unknown = [n for n in names if n not in GROUP_COLUMNS]
    if unknown:
        raise ValueError(
            f"--by: unknown column(s) {', '.join(unknown)}; choose from {', '.join(GROUP_COLUMNS)}"
        )
    return tuple(dict.fromkeys(names))


def build_report(
    logs: Path,
    start: datetime | None = None,
    end: datetime | None = None,
    by: Sequence[str] = DEFAULT_BY,
    policy_file: Path | None = None,
) -> CostReport:
    """Read the log folder and compute the report table and totals (no files written)."""
    by = parse_by(by)
    if start is not None and end is not None and start >= end:
        raise ValueError(
            f"--from ({start:%Y-%m-%d %H:%M}) must be before --to ({end:%Y-%m-%d %H:%M})"
        )
    logs = Path(logs)
    if not (logs / DECISIONS).is_dir():
        raise ValueError(f"{logs}: no decisions/ folder of Parquet segments here")
    classes = load_config(policy_file or DEFAULT_POLICY_FILE).message_classes
    decisions = read_stream(logs, DECISIONS, DECISION_SCHEMA)
    outcomes = read_stream(logs, OUTCOMES, OUTCOME_SCHEMA)
    length = end - start if start is not None and end is not None else None
    lo = start - length if start is not None and length is not None else start
    at = decisions["at"].to_pandas()
    keep = np.ones(len(at), dtype=bool)
    if lo is not None:
        keep &= (at >= pd.Timestamp(lo)).to_numpy()
    if end is not None:
        keep &= (at < pd.Timestamp(end)).to_numpy()
    view = finalized_view(decisions.filter(pa.array(keep)), outcomes, classes, ())
    in_period = np.ones(len(view), dtype=bool)
    if start is not None:
        in_period = (view["at"] >= pd.Timestamp(start)).to_numpy()
    current = view[in_period].reset_index(drop=True)
    table = _aggregate(current, by, shift=None)
    totals = _totals(current)
    if length is not None:
        previous = view[~in_period]
        table = _with_change(table, _aggregate(previous, by, shift=length), by)
        totals = _with_change_totals(totals, _totals(previous))
    else:
        table = _with_change(table, None, by)
        totals = _with_change_totals(totals, None)
    currency = _currency(outcomes, set(current["decision_id"]))
    return CostReport(table, totals, current, by, start, end, currency)


def run_cost_report(opts: CostReportOptions, console: Console | None = None) -> CostReport:
    """Build the report, write CSV, Parquet and HTML under `opts.out`, print the top rows."""
    console = console or report_console()
    report = build_report(opts.logs, opts.start, opts.end, opts.by, opts.policy_file)
    opts.out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": opts.out / f"{REPORT_NAME}.csv",
        "parquet": opts.out / f"{REPORT_NAME}.parquet",
        "html": opts.out / f"{REPORT_NAME}.html",
    }
    report.table.to_csv(paths["csv"], index=False)
    report.table.to_parquet(paths["parquet"], index=False)
    paths["html"].write_text(render_html(report), encoding="utf-8")
    report.paths = paths
    _print(report, console, opts.top)
    return report


def period_label(start: datetime | None, end: datetime | None, view: pd.DataFrame) -> str:
    """The period in words; open ends are described by the data's first or last decision."""
    fmt = "%Y-%m-%d %H:%M"
    if start is None and end is None:
        if view.empty:
            return "all logged decisions (none found)"
        first, last = view["at"].min(), view["at"].max()
        return f"all logged decisions, {first:{fmt}} to {last:{fmt}} UTC"
    left = f"{start:{fmt}}" if start is not None else "the first logged decision"
    right = f"{end:{fmt}}" if end is not None else "the last logged decision"
    return f"{left} to {right} UTC (end excluded)"


def _keys(frame: pd.DataFrame, by: Sequence[str], shift: timedelta | None) -> pd.DataFrame:
    """The grouping columns of each decision; `day` is its UTC date (moved on by `shift`)."""
    keys = pd.DataFrame(index=frame.index)
    for name in by:
        if name == "day":
            at = frame["at"] if shift is None else frame["at"] + pd.Timedelta(shift)
            keys["day"] = at.dt.tz_convert("UTC").dt.strftime("%Y-%m-%d")
        else:
            keys[name] = frame[name].astype(str)
    return keys


def _aggregate(frame: pd.DataFrame, by: Sequence[str], shift: timedelta | None) -> pd.DataFrame:
    """Per group: messages, parts, spend, delivered, within SLA, cost per delivered, retries."""
    data = _keys(frame, by, shift)
    data["messages"] = 1
    data["parts"] = frame["segments"].astype("int64")
    data["spend"] = frame["cost"].astype(float)
    data["delivered"] = frame["delivered"].astype("int64")
    data["delivered_within_sla"] = frame["delivered_within_sla"].astype("int64")
    data["retry_spend"] = np.where(frame["attempt"].to_numpy() > 1, data["spend"], 0.0)
    cols = ["messages", "parts", "spend", "delivered", "delivered_within_sla", "retry_spend"]
    if data.empty:
        out = pd.DataFrame({**{k: pd.Series(dtype=str) for k in by}, **{c: [] for c in cols}})
    else:
        out = data.groupby(list(by), sort=True, dropna=False)[cols].sum().reset_index()
    out["cost_per_delivered"] = _ratio(out["spend"], out["delivered"])
    out["retries_share_of_spend"] = _ratio(out.pop("retry_spend"), out["spend"])
    return out


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    """num / den with NaN where den is zero."""
    den = den.astype(float)
    return num.astype(float).div(den.where(den != 0))


def _pct_change(now: pd.Series | float, before: pd.Series | float) -> pd.Series | float:
    """Change in percent; NaN where the previous value is missing or zero."""
    if isinstance(before, pd.Series):
        return (now / before.where(before != 0) - 1.0) * 100.0
    if before == 0 or np.isnan(before):
        return float("nan")
    return (now / before - 1.0) * 100.0


def _with_change(
    table: pd.DataFrame, previous: pd.DataFrame | None, by: Sequence[str]
) -> pd.DataFrame:
    """Add the previous period's spend and cost per delivered of each group, and the change."""
    if previous is None or previous.empty:
        table["previous_spend"] = np.nan
        table["previous_cost_per_delivered"] = np.nan
    else:
        prev = previous[[*by, "spend", "cost_per_delivered"]].rename(
            columns={"spend": "previous_spend", "cost_per_delivered": "previous_cost_per_delivered"}
        )
        table = table.merge(prev, on=list(by), how="left")
    table["spend_change_pct"] = _pct_change(table["spend"], table["previous_spend"])
    table["cost_per_delivered_change_pct"] = _pct_change(
        table["cost_per_delivered"], table["previous_cost_per_delivered"]
    )
    order = [
        *by,
        "messages",
        "parts",
        "spend",
        "delivered",
        "delivered_within_sla",
        "cost_per_delivered",
        "retries_share_of_spend",
        "previous_spend",
        "spend_change_pct",
        "previous_cost_per_delivered",
        "cost_per_delivered_change_pct",
    ]
    return table[order]


def _totals(frame: pd.DataFrame) -> dict[str, float]:
    """The whole period's figures (computed from the decisions, not from the group rows)."""
    spend = float(frame["cost"].sum())
    delivered = int(frame["delivered"].sum())
    retry = float(frame.loc[frame["attempt"] > 1, "cost"].sum())
    return {
        "messages": len(frame),
        "parts": int(frame["segments"].astype("int64").sum()),
        "spend": spend,
        "delivered": delivered,
        "delivered_within_sla": int(frame["delivered_within_sla"].sum()),
        "cost_per_delivered": spend / delivered if delivered else float("nan"),
        "retries_share_of_spend": retry / spend if spend else float("nan"),
    }


def _with_change_totals(totals: dict[str, float], previous: dict[str, float] | None) -> dict:
    """Totals with the previous period's spend and cost per delivered and the changes."""
    nan = float("nan")
    has = previous is not None and previous["messages"] > 0
    prev_spend = previous["spend"] if previous is not None and has else nan
    prev_cpd = previous["cost_per_delivered"] if previous is not None and has else nan
    return {
        **totals,
        "previous_spend": prev_spend,
        "spend_change_pct": _pct_change(totals["spend"], prev_spend),
        "previous_cost_per_delivered": prev_cpd,
        "cost_per_delivered_change_pct": _pct_change(totals["cost_per_delivered"], prev_cpd),
    }


def _currency(outcomes: pa.Table, decision_ids: set[str]) -> str:
    """The currency of the period's costs; mixed currencies cannot be added up."""
    frame = outcomes.select(["decision_id", "cost", "currency"]).to_pandas()
    frame = frame[frame["decision_id"].isin(decision_ids) & frame["cost"].notna()]
    found = sorted(set(frame["currency"].dropna()))
    if len(found) > 1:
        raise ValueError(
            f"costs in the period are in several currencies ({', '.join(found)}); "
            "they cannot be added up in one report"
        )
    return found[0] if found else "(currency not recorded)"


# ---- output ---------------------------------------------------------------------------------


def _fmt(value: object, column: str) -> str:
    """One cell as text for people."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if column in ("messages", "parts", "delivered", "delivered_within_sla"):
        return f"{int(value):,}"
    if column.endswith("_pct"):
        return f"{value:+.1f}%"
    if column == "retries_share_of_spend":
        return f"{value * 100:.1f}%"
    if column == "cost_per_delivered" or column == "previous_cost_per_delivered":
        return f"{value:,.5f}"
    return f"{value:,.4f}"


_SHORT = {
    "message_class": "class",
    "messages": "msgs",
    "delivered": "deliv.",
    "cost_per_delivered": "cost/deliv.",
    "retries_share_of_spend": "retries",
    "spend_change_pct": "spend vs prev.",
}


def _print(report: CostReport, console: Console, top: int) -> None:
    shown = report.table.sort_values("spend", ascending=False).head(top)
    title = f"Cost per delivered message, {report.period}, in {report.currency}"
    columns = [
        *report.by,
        "messages",
        "spend",
        "delivered",
        "cost_per_delivered",
        "retries_share_of_spend",
        "spend_change_pct",
    ]
    table = Table(title=title)
    for col in columns:
        label = _SHORT.get(col, col)
        table.add_column(label, justify="left" if col in report.by else "right")
    for row in shown.itertuples(index=False):
        table.add_row(*(_fmt(getattr(row, c), c) for c in columns))
    table.add_row(
        *(["total"] + [""] * (len(report.by) - 1)),
        *(_fmt(report.totals[c], c) for c in columns[len(report.by) :]),
        style="bold",
    )
    console.print(table)
    if len(report.table) > top:
        console.print(f"(top {top} of {len(report.table)} rows by spend)")
    for kind, path in (report.paths or {}).items():
        console.print(f"{kind}: {path}", soft_wrap=True, highlight=False)


def _png(fig: plt.Figure) -> str:
    """A figure as a base64 PNG `<img>` tag."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="chart" src="data:image/png;base64,{data}">'


def _no_data(ax: plt.Axes) -> None:
    ax.text(0.5, 0.5, "no data in this period", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def spend_chart(report: CostReport) -> str:
    """Stacked bars: spend per day, one colour per carrier."""
    fig, ax = plt.subplots(figsize=(9, 4))
    view = report.view
    if view.empty:
        _no_data(ax)
        return _png(fig)
    day = view["at"].dt.tz_convert("UTC").dt.strftime("%Y-%m-%d")
    pivot = view.assign(day=day).pivot_table(
        index="day", columns="carrier", values="cost", aggfunc="sum", fill_value=0.0
    )
    bottom = np.zeros(len(pivot))
    for carrier in pivot.columns:
        ax.bar(pivot.index, pivot[carrier], bottom=bottom, label=str(carrier))
        bottom += pivot[carrier].to_numpy()
    ax.set_ylabel(f"spend ({report.currency})")
    ax.set_title("Spend per day, by carrier")
    ax.legend(title="carrier", fontsize="small")
    ax.tick_params(axis="x", rotation=45)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def cost_per_delivered_chart(report: CostReport) -> str:
    """Horizontal bars: cost per delivered message of each carrier over the period."""
    view = report.view
    per = view.groupby("carrier").agg(spend=("cost", "sum"), delivered=("delivered", "sum"))
    per["cpd"] = _ratio(per["spend"], per["delivered"])
    per = per.sort_values("cpd", na_position="first")
    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.45 * max(len(per), 1)))
    if per.empty:
        _no_data(ax)
        return _png(fig)
    ax.barh(per.index.astype(str), per["cpd"].fillna(0.0))
    for y, (value, spend) in enumerate(zip(per["cpd"], per["spend"], strict=True)):
        label = "nothing delivered" if value != value else f"{value:,.5f}"
        if value != value and spend == 0:
            label = "nothing delivered, nothing spent"
        ax.text(value if value == value else 0, y, f"  {label}", va="center", fontsize="small")
    ax.set_xlabel(f"cost per delivered message ({report.currency})")
    ax.set_title("Cost per delivered message, by carrier")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; }
td.key { text-align: left; }
dt { font-weight: bold; margin-top: 0.4em; }
.totals td:first-child { text-align: left; }
"""


def _html_table(frame: pd.DataFrame, keys: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = "".join(
            f'<td class="key">{html.escape(str(v))}</td>'
            if c in keys
            else f"<td>{html.escape(_fmt(v, c))}</td>"
            for c, v in zip(frame.columns, row, strict=True)
        )
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


_TOTAL_LABELS = {
    "messages": "Messages sent",
    "parts": "Message parts",
    "spend": "Spend",
    "delivered": "Delivered",
    "delivered_within_sla": "Delivered in time (within SLA)",
    "cost_per_delivered": "Cost per delivered message",
    "retries_share_of_spend": "Share of spend on retries",
    "previous_spend": "Spend in the previous period",
    "spend_change_pct": "Change of spend",
    "previous_cost_per_delivered": "Cost per delivered message in the previous period",
    "cost_per_delivered_change_pct": "Change of cost per delivered message",
}


def render_html(report: CostReport) -> str:
    """The report as one self-contained HTML page (charts embedded as PNG)."""
    title = f"SMS cost report: {report.period}"
    help_items = "".join(
        f"<dt>{html.escape(c)}</dt><dd>{html.escape(COLUMN_HELP[c])}</dd>"
        for c in report.table.columns
    )
    totals = "".join(
        f"<tr><td>{html.escape(_TOTAL_LABELS[k])}</td><td>{html.escape(_fmt(v, k))}</td></tr>"
        for k, v in report.totals.items()
    )
    change_note = (
        "The previous period is the same length, just before this one."
        if report.start is not None and report.end is not None
        else "No previous-period comparison: run the report with both --from and --to."
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>All amounts are in <strong>{html.escape(report.currency)}</strong>. Times are UTC.
Each message is counted on the day it was sent; its cost includes receipts that arrived later.
Rows are grouped by {html.escape(", ".join(report.by))}. {html.escape(change_note)}</p>
<h2>Totals</h2>
<table class="totals">{totals}</table>
<h2>Charts</h2>
{spend_chart(report)}
{cost_per_delivered_chart(report)}
<h2>What the columns mean</h2>
<dl>{help_items}</dl>
<h2>Detail</h2>
{_html_table(report.table, report.by)}
</body></html>
"""
