"""hitl-mail: answer a paused crewAI Flow by replying to an email.

`MailProvider` is imported lazily: it needs crewAI (the `crewai` extra),
while the daemon's own modules and the CLI do not pay for that import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["MailProvider"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from hitl_mail.provider import MailProvider
else:

    def __getattr__(name: str) -> Any:
        if name == "MailProvider":
            from hitl_mail.provider import MailProvider

            return MailProvider
        raise AttributeError(f"module 'hitl_mail' has no attribute {name!r}")
