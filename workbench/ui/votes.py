"""Blind A/B votes per variant: wins, ties, losses and a confidence interval on the win share."""

from __future__ import annotations

from typing import Any

import pandas as pd

COLUMNS = ["run", "variant", "votes", "wins", "ties", "losses", "win share", "95% CI low", "95% CI high"]


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (scipy's binomtest); None without trials.

    Wilson rather than the normal approximation: with a handful of votes, or all of them wins, the normal
    interval leaves [0, 1] or collapses to a point, while Wilson's stays inside and keeps a width."""
    if trials <= 0:
        return None
    from scipy.stats import binomtest

    interval = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def vote_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """History.leaderboard's rows as the page's table. Win share = wins / votes (a tie counts as a vote that was
    not won), with its 95% Wilson interval; a plain DataFrame, which gradio renders as rows."""
    table = []
    for row in rows:
        wins, ties, losses = int(row["wins"] or 0), int(row["ties"] or 0), int(row["losses"] or 0)
        votes = wins + ties + losses
        interval = wilson_interval(wins, votes)
        table.append({"run": row["run_id"], "variant": row["variant"], "votes": votes, "wins": wins, "ties": ties,
                      "losses": losses, "win share": round(wins / votes, 3) if votes else None,
                      "95% CI low": round(interval[0], 3) if interval else None,
                      "95% CI high": round(interval[1], 3) if interval else None})
    return pd.DataFrame(table, columns=COLUMNS)


def vote_html(table: pd.DataFrame) -> str:
    """The table as plain HTML: every row is in the page as text (gradio's Dataframe draws rows lazily, and a
    list of dicts reached it as "[object Object]")."""
    if table.empty:
        return "<p><i>No blind votes yet.</i></p>"
    return table.to_html(index=False, na_rep="—", classes="vote-rows", border=0, escape=True)
