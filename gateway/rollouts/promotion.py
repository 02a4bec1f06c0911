"""Promotion from the API's side: the scope an override needs and the override body.

The gate itself (criteria, evaluation, the one label-move check) lives in
`prompt_registry.gates`. An override needs the `admin` scope: on the admin API that is the
calling key; on the command line (`gateway.cli.promotion`) an admin key given with
`--admin-key`, so the audit entry names an accountable key.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prompt_registry import GateReport

__all__ = ["ADMIN_SCOPE", "OVERRIDE_PURPOSE", "GateOverrideBody", "report_dict"]

ADMIN_SCOPE = "admin"
# How a refusal of an override for lack of the admin scope ends, on the API and the CLI.
OVERRIDE_PURPOSE = "to override a promotion gate"


class GateOverrideBody(BaseModel):
    """`{"override": {"reason": "..."}}` on a production move: needs the admin scope."""

    model_config = ConfigDict(extra="forbid", regex_engine="python-re")

    reason: str = Field(..., min_length=1, max_length=2000, pattern=r"\S",
                        description="why the promotion gate is overridden (recorded in the audit log)")


def report_dict(report: GateReport | None) -> dict[str, Any] | None:
    return None if report is None else report.as_dict()
