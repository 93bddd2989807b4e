"""Alerts: a finished run checked against the task's `alerts:` thresholds.

A breach never changes the run's status (the judge and the budget decide that). It is reported
three ways: a `warning: alert <name>: ...` line on stderr, a trace tag `atlas.alert.<name>`, and
a failed `alert.<name>` assessment on the trace, so `tag.\\`atlas.alert.min_score\\` != ''` finds
the runs that alerted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atlas.session import RunResult
    from atlas.spec import Alerts


@dataclass(frozen=True)
class Alert:
    name: str
    """The threshold's name in `alerts:`, e.g. `max_wall_s`."""
    value: float
    limit: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_alerts(alerts: Alerts, result: RunResult) -> list[Alert]:
    """The thresholds `result` breached, in the order `alerts:` declares them. A measure the
    run does not have (no cost for an unpriced model, no score when the judge never ran, no
    tool calls) breaches nothing."""
    found: list[Alert] = []
    if alerts.max_wall_s is not None and result.wall_s > alerts.max_wall_s:
        found.append(
            Alert(
                "max_wall_s",
                round(result.wall_s, 3),
                alerts.max_wall_s,
                f"wall time {result.wall_s:.1f} s is over {alerts.max_wall_s:g} s",
            )
        )
    if (
        alerts.max_cost_usd is not None
        and result.cost_usd is not None
        and result.cost_usd > alerts.max_cost_usd
    ):
        found.append(
            Alert(
                "max_cost_usd",
                result.cost_usd,
                alerts.max_cost_usd,
                f"cost ${result.cost_usd:.4f} is over ${alerts.max_cost_usd:g}",
            )
        )
    if (
        alerts.min_score is not None
        and result.score is not None
        and result.score < alerts.min_score
    ):
        found.append(
            Alert(
                "min_score",
                result.score,
                alerts.min_score,
                f"judge score {result.score:.2f} is under {alerts.min_score:g}",
            )
        )
    if alerts.max_tool_error_rate is not None and result.tool_calls:
        rate = result.tool_errors / result.tool_calls
        if rate > alerts.max_tool_error_rate:
            found.append(
                Alert(
                    "max_tool_error_rate",
                    round(rate, 4),
                    alerts.max_tool_error_rate,
                    f"{result.tool_errors} of {result.tool_calls} tool calls failed "
                    f"({rate:.0%}, over {alerts.max_tool_error_rate:.0%})",
                )
            )
    return found
