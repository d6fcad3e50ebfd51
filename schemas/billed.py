"""What a call is billed as, in one place for every service (billing's ledger, the meter's rollups and
re-rating, dashboards): the billed model and the statuses that are billed."""

from __future__ import annotations

# A call is billed as the model that served it; one that never reached a model (rejected, failed before
# routing) has served_model '' and is reported under the name it asked for.
BILLED_MODEL_SQL = "if(served_model = '', requested_model, served_model)"
# Cache hits ('cached') and rejections cost nothing; an upstream error that consumed tokens is billed.
BILLABLE_STATUSES = ("ok", "error")
BILLABLE_STATUSES_SQL = ", ".join(f"'{s}'" for s in BILLABLE_STATUSES)  # for `status IN (...)`


def billed_model(served_model: str | None, requested_model: str) -> str:
    return served_model or requested_model
