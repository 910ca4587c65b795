"""the HTTP outbox: webhook events and bridged answers waiting to be POSTed

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "http_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=32), nullable=True),
        sa.Column("destination", sa.String(length=100), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event", sa.String(length=40), nullable=False),
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("http_outbox", schema=None) as batch_op:
        # The delivery stage's claim: due rows, then "no earlier row of the same
        # request to the same destination still waiting" (per-endpoint order).
        batch_op.create_index("ix_http_outbox_due", ["status", "next_attempt_at"], unique=False)
        batch_op.create_index(
            "ix_http_outbox_order", ["request_id", "destination", "id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_http_outbox_event_id"), ["event_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("http_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_http_outbox_event_id"))
        batch_op.drop_index("ix_http_outbox_order")
        batch_op.drop_index("ix_http_outbox_due")

    op.drop_table("http_outbox")
