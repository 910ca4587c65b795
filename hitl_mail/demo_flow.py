"""The sample flow `hitl-mail demo` pauses and resumes: draft a release note, ask, then publish.

It lives in the package so the daemon's resume worker can import it as
`hitl_mail.demo_flow.DemoReviewFlow` without any `[flows].import_paths`. The
branch that runs after the answer writes a small JSON result to the file named
by the `result_path` state key, because it runs in the daemon's worker
process and the demo process reads the result from outside.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from crewai.flow.flow import Flow, listen, start
from crewai.flow.human_feedback import human_feedback
from pydantic import BaseModel

from hitl_mail.provider import MailProvider

# No path: the demo binds its own config and store with `provider.bind_daemon`
# before kickoff, and the daemon's resume worker binds its own the same way.
PROVIDER = MailProvider()

DRAFT = """## Release note for v1.2

- **Faster startup**: the daemon is ready in under a second.
- Replies with a signature are trimmed correctly.

Publish this note to the changelog?
"""


class DemoState(BaseModel):
    result_path: str = ""
    """Where the branch taken after the answer writes its result (set by kickoff inputs)."""


class DemoReviewFlow(Flow[DemoState]):
    """Draft, ask a human by email, then publish or discard."""

    # The demo tells the story itself; crewAI's per-method console panels,
    # printed from the daemon's resume worker, would interleave with it.
    suppress_flow_events: bool = True
    # The flow never remembers anything; crewAI's automatic Memory would import
    # lancedb (seconds) in the demo and again in every resume worker. crewAI's
    # own internal flows opt out with this same flag.
    _skip_auto_memory: bool = True

    @start()
    def draft(self) -> str:
        return DRAFT

    @human_feedback(
        message="Publish this release note?",
        emit=["approved", "rejected"],
        default_outcome="rejected",
        llm="gpt-4o-mini",
        provider=PROVIDER,
    )
    @listen("draft")
    def review(self) -> str:
        return DRAFT

    @listen("approved")
    def publish(self) -> str:
        return self._finish("published")

    @listen("rejected")
    def discard(self) -> str:
        return self._finish("discarded")

    def _finish(self, action: str) -> str:
        feedback = self.last_human_feedback
        result = {
            "action": action,
            "outcome": feedback.outcome if feedback else None,
            "feedback": feedback.feedback if feedback else None,
            "pid": os.getpid(),
        }
        if self.state.result_path:
            Path(self.state.result_path).write_text(json.dumps(result), encoding="utf-8")
        return action
