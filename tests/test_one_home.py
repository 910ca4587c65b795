"""A request's status is written by transitions.py and nowhere else (a lint over hitl_mail/*.py).

Every state change goes through one module, so each one writes its audit
row and its outbox rows (mail, webhook events) in its own transaction. This
reads the package's source and fails on any other way to write the status:
`FeedbackRequest(status=...)`, `request.status = ...`, a `Transition` built or
`advance`/`Store.transition(s)` called by hand (the values they carry), an
UPDATE of the requests table that may set it, in SQLAlchemy or in SQL text.
A status only named (a response body, a filter, a comparison) is no write.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hitl_mail.models import RequestStatus

pytestmark = pytest.mark.sqlite_only

PACKAGE = Path(__file__).resolve().parent.parent / "hitl_mail"
HOME = "transitions.py"
# The machinery transitions.py drives: the generic conditional update and batch.
MACHINERY = {
    ("store.py", "advance"),
    ("store.py", "apply"),
    ("store.py", "Store.transition"),
    ("store.py", "Store.transitions"),
    ("store.py", "Store.fire_timer"),
}
# Requests built only to be shown, never stored.
NOT_STORED = {("webhooks.py", "sample_payload")}
OTHER_STATUSES = {"OutboxStatus", "InboundStatus", "HttpOutboxStatus"}
STATUS_VALUES = {str(status) for status in RequestStatus}
REQUEST_TABLES = {"FeedbackRequest", "requests", "_requests"}
BY_HAND = {"advance", "apply", "Transition", "transition", "transitions"}


class StatusWrites(ast.NodeVisitor):
    """Collects `(line, what)` for each place that writes a request's status."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.scope: list[str] = []
        self.found: list[tuple[int, str]] = []

    def exempt(self) -> bool:
        where = (self.module, ".".join(self.scope))
        return where in MACHINERY or where in NOT_STORED

    def flag(self, node: ast.AST, what: str) -> None:
        if not self.exempt():
            self.found.append((getattr(node, "lineno", 0), what))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_Call(self, node: ast.Call) -> None:
        name = _called(node.func)
        if name == "FeedbackRequest" and any(k.arg in ("status", None) for k in node.keywords):
            self.flag(node, "FeedbackRequest(status=...)")
        if name in BY_HAND:
            self.flag(node, f"{name}(...) by hand")
        if name == "setattr" and len(node.args) >= 2 and _is_string(node.args[1], "status"):
            self.flag(node, "setattr(..., 'status', ...)")
        if name == "values" and _updates_requests(node) and _may_set_status(node):
            self.flag(node, "UPDATE requests SET status")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self.check_target(target, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.check_target(node.target, node.value)
        self.generic_visit(node)

    def check_target(self, target: ast.expr, value: ast.expr) -> None:
        attribute = isinstance(target, ast.Attribute) and target.attr == "status"
        key = isinstance(target, ast.Subscript) and _is_string(target.slice, "status")
        if (attribute and not _other_status(value)) or (key and _request_status(value)):
            self.flag(target, f"{ast.unparse(target)} = ...")

    def visit_Constant(self, node: ast.Constant) -> None:
        text = node.value.lower() if isinstance(node.value, str) else ""
        if "update requests" in " ".join(text.split()) and "status" in text:
            self.flag(node, "UPDATE requests ... status in SQL text")


def _called(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _is_string(node: ast.expr, text: str) -> bool:
    return isinstance(node, ast.Constant) and node.value == text


def _request_status(value: ast.expr) -> bool:
    """Whether `value` is (or contains) a request status: `RequestStatus.X` or its string."""
    for node in ast.walk(value):
        if isinstance(node, ast.Name) and node.id == "RequestStatus":
            return True
        if isinstance(node, ast.Constant) and node.value in STATUS_VALUES:
            return not _other_status(value)
    return False


def _other_status(value: ast.expr) -> bool:
    """`OutboxStatus.SENT` and the like: the status of another table's row."""
    return isinstance(value, ast.Attribute) and _called(value.value) in OTHER_STATUSES


def _updates_requests(values_call: ast.Call) -> bool:
    """Whether this `.values(...)` belongs to an `update(<the requests table>)` chain."""
    node: ast.expr = values_call.func
    while isinstance(node, ast.Attribute | ast.Call):
        if isinstance(node, ast.Call):
            if _called(node.func) == "update" and node.args:
                table = node.args[0]
                if isinstance(table, ast.Attribute) and table.attr == "__table__":
                    table = table.value
                return _called(table) in REQUEST_TABLES
            node = node.func
        else:
            node = node.value
    return False


def _may_set_status(values_call: ast.Call) -> bool:
    """`status=`, `**values` or a dict: anything that can carry `status`."""
    if values_call.args:
        return True
    return any(k.arg in (None, "status") for k in values_call.keywords)


def status_writes(source: str, module: str = "example.py") -> list[tuple[int, str]]:
    visitor = StatusWrites(module)
    visitor.visit(ast.parse(source))
    return visitor.found


def test_only_transitions_write_a_request_status() -> None:
    found = [
        f"hitl_mail/{path.name}:{line}: {what}"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != HOME
        for line, what in status_writes(path.read_text(), path.name)
    ]
    assert found == [], "request status written outside transitions.py:\n" + "\n".join(found)


def test_the_home_of_transitions_is_where_the_check_looks() -> None:
    assert (PACKAGE / HOME).exists()
    assert status_writes((PACKAGE / HOME).read_text(), HOME), "the lint no longer sees writes"


# How each writer changed a request's state before transitions.py (abridged from its code).
EARLIER_WRITERS = {
    "intake, unroutable": """
def create_request(config, store, context, state):
    request.status = RequestStatus.UNROUTABLE
    store.add(request)
""",
    "intake, created": """
def _new_request(context, state, now):
    return FeedbackRequest(id=tokens.new_request_id(), status=RequestStatus.PENDING)
""",
    "answering, answered": """
def _answered(self, answer):
    values = {"status": RequestStatus.ANSWERED, "outcome": outcome}
    return Transition(request.id, (RequestStatus.PENDING,), values, also)
""",
    "timers, auto-response": """
def _auto_respond(self, session, request):
    if not advance(session, request.id, [RequestStatus.PENDING], values):
        return False
""",
    "resume, record_result": """
def record_result(store, request_id, attempts, result):
    store.transition(request_id, [RequestStatus.ANSWERED], {"status": RequestStatus.RESUMED})
""",
    "actions, cancel": """
def cancel_request(config, store, request_id, actor):
    with store.session() as session:
        advance(session, request_id, [RequestStatus.PENDING], {"status": "cancelled"})
""",
    "store, retry_resume": """
class Store:
    def retry_resume(self, request_id, actor):
        return self.transition(request_id, [RequestStatus.RESUME_FAILED], values)
""",
    "a raw session": """
def force(session, request_id):
    session.execute(sa.update(FeedbackRequest).where(id == request_id).values(**values))
""",
    "SQL text": """
def force(conn):
    conn.execute(sa.text("UPDATE requests SET status = 'answered' WHERE id = :id"))
""",
    "setattr": """
def force(request):
    setattr(request, "status", "answered")
""",
}


@pytest.mark.parametrize("writer", list(EARLIER_WRITERS))
def test_the_check_finds_every_way_status_was_written_before(writer: str) -> None:
    assert status_writes(EARLIER_WRITERS[writer]), writer


def test_the_check_leaves_other_tables_statuses_and_reads_alone() -> None:
    source = """
def send(store, row, request):
    store.update_outbox(row.id, status=OutboxStatus.SENT)
    update = {"status": OutboxStatus.FAILED, "attempts": 2}
    shown = {"status": request.status}
    answer = CallbackAnswer(id=request.id, status=RequestStatus.ANSWERED)
    pending = store.requests(status=RequestStatus.PENDING)
    if request.status == RequestStatus.PENDING:
        return sa.update(FeedbackRequest).values(lease_until=None)
"""
    assert status_writes(source) == []
