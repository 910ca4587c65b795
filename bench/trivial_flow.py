"""The trivial flow that benchmark item 2 resumes, both in the daemon and in crewAI's own loop.

One feedback point with two outcomes and a listener per outcome that does
nothing but return: what is measured is restoring and resuming, not work.
`default_outcome="approved"` lets crewAI's own loop resume with an empty
feedback and take the same `approved` branch without an LLM call.
"""

from __future__ import annotations

import os

from crewai.flow.flow import Flow, listen, start
from crewai.flow.human_feedback import human_feedback

from hitl_mail import MailProvider

PROVIDER = MailProvider(os.environ.get("HITL_MAIL_CONFIG"))


class TrivialFlow(Flow[dict]):  # type: ignore[type-arg]
    @start()
    def ask(self) -> str:
        return "Ship it?"

    @human_feedback(
        message="Approve?",
        emit=["approved", "rejected"],
        default_outcome="approved",
        llm="gpt-4o-mini",
        provider=PROVIDER,
    )
    @listen("ask")
    def review(self) -> str:
        return "A short draft."

    @listen("approved")
    def done(self) -> str:
        return "done"

    @listen("rejected")
    def dropped(self) -> str:
        return "dropped"
