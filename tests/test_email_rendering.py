"""Every email as a responder sees it: rendered in headless Chromium, on a phone and a desktop.

Each mail kind is loaded at 360 px and 1280 px wide. Nothing may scroll
sideways, whatever the method output holds; on the phone the options and the
deadline (when the mail has them) are on the first screen. The screenshots
are saved to tests/screenshots/ (ignored by git; `HITL_MAIL_SCREENSHOTS`
names another folder) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from hitl_mail import compose
from hitl_mail.compose import Reassignment, RequestContent, Sender

pytestmark = pytest.mark.sqlite_only

SCREENSHOTS = Path(os.environ.get("HITL_MAIL_SCREENSHOTS") or Path(__file__).parent / "screenshots")
CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()),
    None,
)
SENDER = Sender("Reviews <reviews@mail.example.com>")
TO = "Ann Example <ann@example.org>"
REPLY_TO = "reply+mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpjqwe3dd@reply.example.com"
THREAD = "<hitl.0123456789abcdef0123456789abcdef@mail.example.com>"
EMIT = ("approved", "rejected", "needs_revision")

OUTPUT = (
    "# Quarterly budget\n\n"
    "The plan below needs sign-off. Source: https://example.com/"
    + "very-long-path-segment-"
    * 8
    + "\n\n"
    "| Team | Q1 | Q2 | Q3 | Q4 | Total | Owner |\n"
    "|------|---:|---:|---:|---:|------:|-------|\n"
    "| Platform engineering | 120,000 | 125,000 | 130,000 | 135,000 | 510,000 | ann@example.org |\n"
    "| Marketing | 80,000 | 95,000 | 90,000 | 110,000 | 375,000 | bob@example.org |\n\n"
    "Steps:\n"
    "- Review the totals\n"
    "  - check Q4 against the forecast\n"
    "    - including the contractors\n"
    "- Sign off\n\n"
    "```python\n"
    + "total = sum("
    + ", ".join(f"q{i}" for i in range(40))
    + ")  # "
    + "x" * 40
    + "\n```\n"
)


def content(**changes: Any) -> RequestContent:
    return RequestContent(
        request_id="aaaabbbbccccdddd",
        flow_class="finance.flows.BudgetFlow",
        method_name="approve_budget",
        message="Approve the Q1–Q4 budget?",
        method_output=changes.pop("method_output", OUTPUT),
        emit=EMIT,
        default_outcome="needs_revision",
        deadline=datetime.now(UTC) + timedelta(days=2, hours=3),
        auto_outcome="rejected",
        **changes,
    )


def _thread(**kw: Any) -> dict[str, Any]:
    return {"sender": SENDER, "to": TO, "thread_id": THREAD, **kw}


def _error(kind: compose.ErrorKind, **kw: Any) -> Callable[[], EmailMessage]:
    return lambda: compose.error_mail(kind, content(), **_thread(reply_to=REPLY_TO, **kw))


MAILS: dict[str, Callable[[], EmailMessage]] = {
    "notification": lambda: compose.notification(
        content(), sender=SENDER, to=TO, reply_to=REPLY_TO, message_id=THREAD
    ),
    "reminder": lambda: compose.reminder(content(), reply_to=REPLY_TO, **_thread()),
    "escalation": lambda: compose.notification(
        content(),
        sender=SENDER,
        to=TO,
        reply_to=REPLY_TO,
        message_id=THREAD,
        reassigned=Reassignment("bob@example.org", timedelta(hours=4)),
    ),
    "confirmation": lambda: compose.confirmation(
        content(), outcome="approved", feedback="approved", read_as="exact", **_thread()
    ),
    "already_answered": _error(
        "already_answered", answered_outcome="approved", answered_feedback="approved"
    ),
    "wrong_sender": _error("wrong_sender", from_address="ann.private@example.net"),
    "expired": _error("expired", fresh_reply_to=REPLY_TO),
    "expired_not_pending": _error("expired"),
    "undecided": _error("undecided", your_reply="Hi team, thanks for this"),
    "cancelled": _error("cancelled", replied=False),
    "reassigned": _error(
        "reassigned",
        replied=False,
        reassigned_to="bob@example.org",
        reassigned_after=timedelta(hours=4),
    ),
    "auto_response": lambda: compose.auto_response(content(), outcome="rejected", **_thread()),
}
# What must be on the phone's first screen, beside the title.
ANSWERABLE = {"notification", "reminder", "escalation", "undecided", "expired", "wrong_sender"}
WITH_DEADLINE = {"notification", "reminder", "escalation"}


def html_of(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    return str(part.get_content())


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no chromium is installed (.ci/run installs Debian's)")
        pytest.skip("no chromium found (apt-get install chromium); CI always runs this test")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def _visible(page: Any, text: str, height: int) -> bool:
    """Whether an element holding exactly `text` lies within the first `height` pixels."""
    box = page.get_by_text(text, exact=True).first.bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= height


@pytest.mark.parametrize("kind", sorted(MAILS))
def test_every_mail_fits_a_phone_and_a_desktop_and_shows_how_to_answer_first(
    browser: Any, kind: str
) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page_html = html_of(MAILS[kind]())
    for width, height in ((360, 740), (1280, 800)):
        page = browser.new_page(viewport={"width": width, "height": height})
        try:
            page.set_content(page_html, wait_until="domcontentloaded")
            page.screenshot(path=str(SCREENSHOTS / f"{kind}-{width}.png"), full_page=True)
            scroll, inner = page.evaluate(
                "[document.documentElement.scrollWidth, window.innerWidth]"
            )
            assert scroll <= inner, f"{kind} at {width}px scrolls sideways: {scroll} > {inner}"
            if width != 360:
                continue
            assert _visible(page, page.locator("h1").first.inner_text(), height)
            if kind in ANSWERABLE:
                for option in EMIT:
                    assert _visible(page, option, height), f"{option} not on the first screen"
            if kind in WITH_DEADLINE:
                deadline = page.locator("p", has_text="Please answer by").first
                box = deadline.bounding_box()
                assert box is not None
                assert box["y"] + box["height"] <= height, "the deadline is below the first screen"
        finally:
            page.close()


def test_the_method_output_keeps_its_structure_on_a_phone(browser: Any) -> None:
    page = browser.new_page(viewport={"width": 360, "height": 740})
    try:
        page.set_content(html_of(MAILS["notification"]()), wait_until="domcontentloaded")
        assert page.locator("h1").count() == 1  # the output's "# Quarterly budget" is below it
        assert page.locator("h3", has_text="Quarterly budget").count() == 1
        assert page.locator("ul ul ul li", has_text="including the contractors").count() == 1
        assert page.locator("ul ul li", has_text="check Q4").count() == 1
        table_box = page.locator("table").first.bounding_box()
        assert table_box is not None
        assert table_box["width"] > 360  # wider than the phone: it scrolls in its own box
        code = page.locator("pre").first.bounding_box()
        assert code is not None
        assert code["x"] + code["width"] <= 360
    finally:
        page.close()
