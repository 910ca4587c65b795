"""STARTTLS on the reply listener, with a configured certificate."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosmtplib
import pytest
from conftest import (
    MailSink,
    free_port,
    reply_to,
    request_context,
    self_signed,
    write_config,
)
from llm_server import FakeLLMServer

from hitl_mail import intake
from hitl_mail.app import App
from hitl_mail.config import load_config
from hitl_mail.models import RequestStatus
from hitl_mail.store import Store

CONTEXT = request_context(
    flow_id="f-tls", flow_class="nowhere.Flow", emit=["approved", "rejected"], llm=None
)  # never resumed here: these tests stop at the answer


@pytest.mark.parametrize("required", [False, True])
async def test_a_reply_over_starttls_is_accepted_and_plain_text_is_refused_when_tls_is_required(
    tmp_path: Path, database_url: str, mail_sink: MailSink, llm: FakeLLMServer, required: bool
) -> None:
    cert, key = self_signed(tmp_path, "reply.example.com")
    extra = f'\n[inbound]\ntls_cert = "{cert}"\ntls_key = "{key}"\nrequire_starttls = {str(required).lower()}\n'
    path = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=free_port(),
        relay_port=mail_sink.port,
        llm_url=llm.url,
    )
    text = path.read_text().replace(
        'max_message_size = "200KB"',
        'max_message_size = "200KB"' + extra.replace("\n[inbound]\n", "\n"),
    )
    path.write_text(text)
    config = load_config(path)
    store = Store(config.daemon.database_url)
    store.migrate()
    try:
        async with App(config) as app:
            request = await asyncio.to_thread(
                intake.create_request, config, store, dict(CONTEXT), {}
            )
            deadline = time.monotonic() + 20
            while not mail_sink.of("notification", request.id) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            [notification] = mail_sink.of("notification", request.id)
            reply = reply_to(notification, "approved")

            plain = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.smtp_port, start_tls=False)
            await plain.connect()
            await plain.ehlo()
            assert "starttls" in plain.esmtp_extensions
            if required:
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                    await plain.sendmail(
                        "owner@example.com", [str(notification["Reply-To"])], reply.as_bytes()
                    )
                assert refused.value.code == 530
            await plain.quit()

            await aiosmtplib.send(
                reply,
                hostname="127.0.0.1",
                port=app.smtp_port,
                start_tls=True,
                validate_certs=False,
            )
            while (
                store.get(request.id).status == RequestStatus.PENDING
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
            assert store.get(request.id).outcome == "approved"
    finally:
        store.close()
