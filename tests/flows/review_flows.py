"""Flows the end-to-end tests run in real processes (kickoff here, resume in the daemon).

Every listener appends a JSON line to the file named by $HITL_TEST_EVENTS, so
a test can observe from outside the daemon which branch ran, in which process.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from crewai.flow.flow import Flow, listen, or_, start
from crewai.flow.human_feedback import human_feedback

from hitl_mail import MailProvider

PROVIDER = MailProvider(os.environ.get("HITL_MAIL_CONFIG"))
OUTPUT = """Quarterly budget proposal

| item | cost |
|------|------|
| servers | 1200 |

**Total: 1200** <script>alert("x")</script>
"""


def record(event: str, **data: Any) -> None:
    with open(os.environ["HITL_TEST_EVENTS"], "a", encoding="utf-8") as events:
        events.write(json.dumps({"event": event, "pid": os.getpid(), **data}) + "\n")


class ReviewFlow(Flow[dict[str, Any]]):
    @start()
    def generate(self) -> str:
        self.state.setdefault("rounds", 0)
        return "draft"

    @human_feedback(
        message="Approve the budget?",
        emit=["approved", "rejected", "needs_revision"],
        llm="gpt-4o-mini",
        provider=PROVIDER,
    )
    @listen(or_("generate", "needs_revision"))
    def review(self) -> str:
        self.state["rounds"] = self.state.get("rounds", 0) + 1
        return OUTPUT

    @listen("approved")
    def publish(self) -> str:
        marker = self.state.get("die_once")
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)  # the worker process dies mid-resume, as a segfault would end it
        record(
            "approved",
            flow_id=self.state["id"],
            rounds=self.state["rounds"],
            feedback=self.last_human_feedback.feedback,
        )
        if self.state.get("slow"):
            time.sleep(float(self.state["slow"]))
            record("slow_done")
        if self.state.get("warn"):  # as a library would warn, through `logging`
            logging.getLogger("crewai.flow.review").warning(self.state["warn"])
        return "published"

    @listen("rejected")
    def discard(self) -> str:
        record(
            "rejected",
            flow_id=self.state["id"],
            rounds=self.state["rounds"],
            feedback=self.last_human_feedback.feedback,
        )
        return "discarded"


class AsyncReviewFlow(Flow[dict[str, Any]]):
    """The same review with async methods, started with `kickoff_async`."""

    @start()
    async def generate(self) -> str:
        return "draft"

    @human_feedback(
        message="Approve (async)?",
        emit=["approved", "rejected"],
        llm="gpt-4o-mini",
        provider=PROVIDER,
    )
    @listen("generate")
    async def review(self) -> str:
        return "async draft"

    @listen("approved")
    async def publish(self) -> None:
        record("async_approved", flow_id=self.state["id"])


def kickoff(inputs: dict[str, Any] | None = None, count: int = 1, flow: str = "ReviewFlow") -> None:
    """Run `count` flows until they pause; print each one's pending callback info as a JSON line."""
    import asyncio

    from crewai.flow.persistence import SQLiteFlowPersistence

    for _ in range(count):
        if flow == "AsyncReviewFlow":
            result = asyncio.run(AsyncReviewFlow().kickoff_async(inputs=dict(inputs or {})))
        elif flow == "PersistedReviewFlow":  # the flow brings its own crewAI persistence
            own = SQLiteFlowPersistence(os.environ["HITL_TEST_EVENTS"] + ".crewai.db")
            result = ReviewFlow(persistence=own).kickoff(inputs=dict(inputs or {}))
        else:
            result = ReviewFlow().kickoff(inputs=dict(inputs or {}))
        info = getattr(result, "callback_info", None)
        print(
            json.dumps(
                {"paused": info is not None, "callback_info": info, "type": type(result).__name__}
            )
        )


if __name__ == "__main__":
    kickoff(json.loads(sys.argv[1]) if len(sys.argv) > 1 else None)
