"""Hostile mail: whatever a stranger sends, parsing answers, in bounded work, without trusting it.

Example cases pin each bound (charsets, MIME parameters, structure, header
values); property-based cases (Hypothesis) throw generated MIME trees and
mutated real replies (the corpus under ``tests/replies/``) at ``parse_reply``,
and generated mailboxes at the strict From reader, compared with the stdlib's
own address parser where both call the input well-formed. Work is bounded by
size here, never by wall time (bench/fuzz.py measures time on 100,000 cases).
"""

from __future__ import annotations

import base64
import email.policy
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hitl_mail.replies import MAX_TEXT_CHARS, ParsedReply, parse_reply
from hitl_mail.senders import BadSender, mailbox, sender_of

pytestmark = pytest.mark.sqlite_only

CORPUS = Path(__file__).parent / "replies"
SEEDS = [path.read_bytes() for path in sorted(CORPUS.glob("**/*.eml"))]
PERSON = "jane.doe@example.org"
HEADER_CAP = 16 * 1024
FORBIDDEN = ["punycode", "idna", "unicode_escape", "raw_unicode_escape", "rot13", "utf-7"]
FORBIDDEN += ["base64", "zlib_codec", "uu", "hex", "bz2", "quopri"]
UNKNOWN = ["x-unknown", "unknown-8bit", "utf8mb4", ""]
ALLOWED = ["utf-8", "us-ascii", "iso-8859-1", "windows-1252", "koi8-r", "shift_jis"]
ALLOWED += ["iso-2022-jp", "gb18030", "big5", "euc-kr", "utf-16", "latin1", "UTF8"]
HEADERS = b"From: Jane Doe <jane.doe@example.org>\r\nSubject: Re: Approve?\r\n"
HEADERS += b"Message-ID: <m1@example.org>\r\n"


def cases(count: int) -> settings:
    """Hypothesis settings: ``count`` cases, the same on every run (CI never flakes on a new
    one), no example database, no wall-clock deadline (the machine may be loaded)."""
    return settings(
        max_examples=count,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def parse(raw: bytes) -> ParsedReply:
    return parse_reply(raw, envelope_from=PERSON, own_domains={"reply.example.com"})


def text_part(body: bytes, *, charset: str, extra: bytes = b"") -> bytes:
    return (
        HEADERS + b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n" + extra
        + b"\r\n" + body
    )  # fmt: skip


def assert_bounded(reply: ParsedReply) -> None:
    """What any reply, however hostile, parses into: short, clean text and a sane sender."""
    assert isinstance(reply, ParsedReply)
    assert len(reply.text) <= MAX_TEXT_CHARS
    assert "\x00" not in reply.text + reply.subject + reply.first_line
    assert len(reply.subject) <= HEADER_CAP
    assert reply.first_line in reply.text
    assert (reply.from_address is None) == (reply.from_error is not None)
    assert reply.from_address is None or "@" in reply.from_address
    if reply.malformed is not None:
        assert (reply.text, reply.first_line) == ("", "")


# --- charsets -----------------------------------------------------------------------------


@pytest.mark.parametrize("charset", FORBIDDEN)
def test_a_body_in_a_codec_that_is_no_mail_charset_is_malformed(charset: str) -> None:
    reply = parse(text_part(b"approved\r\n" * 1000, charset=charset))

    assert reply.malformed is not None
    assert "not allowed" in reply.malformed
    assert reply.first_line == ""
    assert reply.from_address == "jane.doe@example.org"  # still known, for the audit trail


def test_a_megabyte_of_punycode_is_refused_without_decoding_it() -> None:
    # Decoding this took over two minutes; refusing it costs a scan of the bytes.
    reply = parse(text_part(bytes(range(0x61, 0x7B)) * 40_000, charset="punycode"))

    assert reply.malformed == "charset punycode is not allowed"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            HEADERS + b"Content-Type: multipart/mixed; boundary*=punycode''abc-def\r\n\r\nx",
            id="rfc2231-boundary",
        ),
        pytest.param(
            HEADERS + b"Content-Type: text/plain; charset*=idna''x\r\n\r\napproved",
            id="rfc2231-charset",
        ),
        pytest.param(
            HEADERS + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Disposition: attachment; filename*0*=punycode''abc; filename*1=\"d\"\r\n"
            b"\r\nx\r\n--b--\r\n",
            id="rfc2231-filename-continued",
        ),
        pytest.param(
            b"From: a@b.example\r\nSubject: =?punycode?q?abc-def?=\r\n\r\napproved",
            id="encoded-word-subject",
        ),
        pytest.param(
            b"From: =?unicode_escape?q?x?= <a@b.example>\r\n\r\napproved",
            id="encoded-word-display-name",
        ),
        pytest.param(
            b"From: a@b.example\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nok\r\n--b\r\n"
            b"Content-Type: text/html; charset=raw_unicode_escape\r\n\r\n<p>ok</p>\r\n--b--\r\n",
            id="second-part",
        ),
        pytest.param(
            HEADERS + b"Content-Type: text/plain; charset*0=puny; charset*1=code\r\n\r\napproved",
            id="rfc2231-continued-charset",
        ),
    ],
)
def test_a_forbidden_charset_wherever_a_message_names_it_makes_the_message_malformed(
    raw: bytes,
) -> None:
    reply = parse(raw)

    assert reply.malformed is not None
    assert "not allowed" in reply.malformed


@pytest.mark.parametrize(
    ("charset", "body"),
    [
        pytest.param("x-unknown", "Approuvé".encode(), id="utf-8-bytes"),
        pytest.param("unknown-8bit", "Approuvé".encode("cp1252"), id="windows-1252-bytes"),
        pytest.param("utf8mb4", "Approuvé".encode(), id="mysql-label"),
    ],
)
def test_an_unknown_charset_label_is_read_as_if_the_part_had_none(
    charset: str, body: bytes
) -> None:
    reply = parse(text_part(body, charset=charset))

    assert (reply.malformed, reply.first_line) == (None, "Approuvé")


@pytest.mark.parametrize(
    ("charset", "feedback"),
    [
        ("iso-2022-jp", "承認します"),
        ("shift_jis", "承認します"),
        ("euc-kr", "승인합니다"),
        ("gb18030", "批准"),
        ("big5", "批准"),
        ("koi8-r", "Одобрено"),
        ("windows-1251", "Одобрено"),
        ("iso-8859-7", "Εγκρίνεται"),
        ("utf-16", "Approved ✓"),
        ("latin1", "Approuvé"),
    ],
)
def test_the_charsets_mail_is_written_in_are_read(charset: str, feedback: str) -> None:
    reply = parse(text_part((feedback + "\r\n").encode(charset), charset=charset))

    assert (reply.malformed, reply.first_line) == (None, feedback)


def test_encoded_words_are_decoded_with_a_character_split_between_two_of_them() -> None:
    raw = b"From: a@b.example\r\nSubject: =?utf-8?q?Re=3A_R=C3?=\r\n =?utf-8?q?=A9vision?=\r\n\r\nx"

    assert parse(raw).subject == "Re: Révision"


def test_a_part_cut_before_decoding_keeps_its_charset() -> None:
    # 1.5 MiB of two-byte characters: cut at 1 MiB, possibly inside a character.
    body = base64.encodebytes(("é" * 800_000).encode())
    raw = text_part(body, charset="utf-8", extra=b"Content-Transfer-Encoding: base64\r\n")

    reply = parse(raw)

    assert reply.malformed is None
    assert set(reply.first_line) == {"é"}


# --- structure and headers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param(b'multipart/mixed; boundary="' + b";" * 20_000 + b'"', id="semicolons"),
        pytest.param(b"text/plain; " + b"a=b; " * 100, id="many-parameters"),
        pytest.param(b"text/plain; name=" + b"x" * 5000, id="long-value"),
    ],
)
def test_a_mime_field_too_long_for_the_parameter_parser_is_malformed(content_type: bytes) -> None:
    # The stdlib's parameter parser is quadratic: 100 KB of ";" in quotes took 40 s.
    reply = parse(HEADERS + b"Content-Type: " + content_type + b"\r\n\r\napproved\r\n")

    assert reply.malformed == "a Content-Type or Content-Disposition field too long to read safely"


def test_a_structure_too_costly_to_split_is_read_for_its_headers_only() -> None:
    # The stdlib checks each line against each enclosing boundary: 5 x 300,000 here.
    nesting = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(5)
    )
    raw = HEADERS + nesting + b"\r\napproved\r\n" + b"\r\n" * 300_000

    reply = parse(raw)

    assert (reply.malformed, reply.text) == (None, "")
    assert (reply.message_id, reply.from_address) == ("m1@example.org", "jane.doe@example.org")
    assert parse(raw[:-560_000]).first_line == "approved"  # the same with 20,000 lines


@pytest.mark.parametrize(
    "name", ["Subject", "References", "In-Reply-To", "Message-ID", "Content-Type", "X-Long"]
)
def test_a_huge_header_value_is_cut_before_it_is_read(name: str) -> None:
    value = b"=?utf-8?q?a?= " * 17_000 if name == "Subject" else b"<a@b> " * 40_000
    raw = b"From: a@b.example\r\n" + name.encode() + b": " + value + b"\r\n\r\napproved\r\n"

    reply = parse(raw)

    assert_bounded(reply)
    assert reply.first_line == "approved" or name == "Content-Type"
    assert len(reply.references) + len(reply.in_reply_to) <= HEADER_CAP // 6


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"a" * 250_000, id="run-without-at"),
        pytest.param(b"a@" * 125_000, id="run-of-at-signs"),
        pytest.param(b"<" * 250_000, id="angle-brackets"),
    ],
)
def test_address_like_header_values_are_read_in_one_pass(value: bytes) -> None:
    for name in (b"From", b"References", b"In-Reply-To", b"Message-ID"):
        assert_bounded(parse(name + b": " + value + b"\r\n\r\nx"))


def test_a_header_section_over_256_kib_is_malformed_and_names_no_sender() -> None:
    raw = HEADERS + b"X-Filler: a\r\n" * 25_000 + b"\r\napproved\r\n"

    reply = parse(raw)

    assert reply.malformed == "a header section over 256 KiB"
    assert (reply.from_address, reply.from_error) == (None, "a header section over 256 KiB")
    assert reply.message_id == "m1@example.org"  # read from its first 256 KiB


@pytest.mark.parametrize(
    ("subject", "read"),
    [
        pytest.param(b"R\xc3\xa9\x00vision", "Révision", id="utf-8"),  # RFC 6532
        pytest.param(b"R\xe9vision \x00\x80", "Révision €", id="windows-1252"),
    ],
)
def test_nul_bytes_and_8bit_headers_never_reach_the_text(subject: bytes, read: str) -> None:
    raw = (
        b"From: Jane <jane@example.org>\r\nSubject: " + subject + b"\r\n"
        b"Content-Type: text/plain\r\n\r\napp\x00roved\r\n"
    )

    reply = parse(raw)

    assert (reply.subject, reply.first_line) == (read, "approved")


def test_deeply_nested_attached_messages_are_survived() -> None:
    nested = HEADERS + b"Content-Type: message/rfc822\r\n\r\n" * 3000 + b"\r\napproved\r\n"

    assert_bounded(parse(nested))


def test_parsing_hostile_mail_logs_no_header_or_body_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    marker = b"SECRET-MARKER"
    hostile = [
        b"From: " + marker + b"\r\nSubject: =?x-bogus?q?" + marker + b"?=\r\n\r\n" + marker,
        HEADERS + b"Content-Type: multipart/mixed; boundary=" + marker + b"\r\n\r\n--x\r\n"
        b"Content-Type: text/plain; charset=" + marker + b"\r\n\r\n" + marker,
        HEADERS + b"Content-Type: message/rfc822\r\n\r\n" * 2000 + marker,
        HEADERS + b"Content-Transfer-Encoding: base64\r\n\r\n" + marker + b"!!",
    ]
    with caplog.at_level(logging.DEBUG):
        for raw in hostile:
            parse(raw)

    assert all(marker.decode() not in record.getMessage() for record in caplog.records)


# --- spoofed senders, through parse_reply ------------------------------------------------


@pytest.mark.parametrize(
    ("from_lines", "address"),
    [
        pytest.param(
            [b"From: =?utf-8?q?Boss_=3Cboss=40corp=2Ecom=3E?= <mallory@attacker.example>"],
            "mallory@attacker.example",
            id="encoded-display-name",
        ),
        pytest.param([b"From: boss@corp.com <mallory@x.example>"], None, id="address-as-name"),
        pytest.param([b"From: boss@corp.com, mallory@x.example"], None, id="two-mailboxes"),
        pytest.param([b"From: Team: boss@corp.com;"], None, id="group"),
        pytest.param([b"From: boss@corp.com", b"From: mallory@x.example"], None, id="two-froms"),
        pytest.param([b"From: mallory@x.example (boss@corp.com)"], "mallory@x.example", id="cmt"),
        pytest.param([b"From: boss@corp.com\x00 <m@x.example>"], None, id="nul"),
        pytest.param([b"From: Boss <boss@corp.com\xff>"], None, id="8-bit"),
    ],
)
def test_a_spoofed_from_yields_the_real_mailbox_or_no_sender_at_all(
    from_lines: list[bytes], address: str | None
) -> None:
    raw = b"".join(line + b"\r\n" for line in from_lines) + b"Subject: Re: x\r\n\r\napproved\r\n"

    reply = parse(raw)

    assert reply.from_address == address
    assert (reply.from_error is None) == (address is not None)


# --- property-based: generated MIME trees -------------------------------------------------


@dataclass(frozen=True)
class Tree:
    raw: bytes  # the part, headers and body
    charsets: frozenset[str]  # every charset named in it


WORDS = st.text(alphabet=st.characters(blacklist_characters="=?\x00"), max_size=60)


@st.composite
def leaves(draw: st.DrawFn) -> Tree:
    charset = draw(st.sampled_from(ALLOWED + UNKNOWN + FORBIDDEN))
    subtype = draw(st.sampled_from(["plain", "html", "csv"]))
    text = draw(WORDS)
    try:
        body = text.encode(charset or "utf-8")
    except (LookupError, UnicodeError, TypeError):
        body = text.encode("utf-8", "surrogatepass")
    body += draw(st.sampled_from([b"", b"\x00", b"\xff\xfe\x80", b"\r", b"\n.\n"]))
    encoding = draw(st.sampled_from(["8bit", "base64", "base64-one-line", "quoted-printable"]))
    if encoding == "base64":
        body = base64.encodebytes(body * draw(st.integers(1, 50)))
    elif encoding == "base64-one-line":
        body, encoding = base64.b64encode(body * draw(st.integers(1, 2000))), "base64"
    elif encoding == "quoted-printable":
        body = body.replace(b"=", b"=3D") + b"=\r\n=ZZ=4"
    head = f'Content-Type: text/{subtype}; charset="{charset}"\r\n'
    head += f"Content-Transfer-Encoding: {encoding}\r\n"
    return Tree(head.encode() + b"\r\n" + body + b"\r\n", frozenset({charset}))


def multiparts(children: st.SearchStrategy[Tree]) -> st.SearchStrategy[Tree]:
    @st.composite
    def build(draw: st.DrawFn) -> Tree:
        parts = draw(st.lists(children, min_size=0, max_size=4))
        boundary = draw(st.sampled_from(["b", "=_Part_1", "x" * 70, "", " sp ", '"q"']))
        written = draw(st.sampled_from([boundary, boundary + "x", boundary.upper()]))
        closed = draw(st.booleans())
        subtype = draw(st.sampled_from(["mixed", "alternative", "related", "report"]))
        head = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()
        body = b"".join(b"--" + written.encode() + b"\r\n" + part.raw for part in parts)
        body += b"--" + written.encode() + b"--\r\n" if closed else b""
        charsets = frozenset().union(*(part.charsets for part in parts))
        return Tree(head + b"preamble\r\n" + body, charsets)

    @st.composite
    def attached(draw: st.DrawFn) -> Tree:
        inner = draw(children)
        return Tree(b"Content-Type: message/rfc822\r\n\r\n" + HEADERS + inner.raw, inner.charsets)

    return st.one_of(build(), attached())


TREES = st.recursive(leaves(), multiparts, max_leaves=6)


@cases(120)
@given(tree=TREES, subject_charset=st.sampled_from(ALLOWED + UNKNOWN + FORBIDDEN))
def test_a_generated_mime_tree_parses_and_a_forbidden_charset_anywhere_is_malformed(
    tree: Tree, subject_charset: str
) -> None:
    subject = f"Subject: =?{subject_charset or 'utf-8'}?q?Re=3A_x?=\r\n".encode()

    reply = parse(HEADERS + subject + b"MIME-Version: 1.0\r\n" + tree.raw)

    assert_bounded(reply)
    named = tree.charsets | {subject_charset or "utf-8"}
    if named & set(FORBIDDEN):
        assert reply.malformed is not None
    else:
        assert reply.malformed is None
    assert reply.from_address == "jane.doe@example.org"


# --- property-based: mutated real replies ---------------------------------------------------

HOSTILE_BYTES = [
    b"\x00", b"\r", b"\n", b"\r\n\r\n", b"\xff\xfe", b"\xc3", b"=?punycode?q?abc?=",
    b"=?utf-8?b?", b"charset=idna", b'boundary="', b"--", b"(", b")", b'"', b"<", b">", b"@",
    b"\r\nContent-Type: multipart/mixed; boundary=x\r\n", b"\r\nContent-Type: message/rfc822\r\n",
    b"\r\nFrom: boss@corp.com\r\n", b"\r\nContent-Transfer-Encoding: base64\r\n", b";" * 100,
    b"\r\n\t", b"=\r\n", b"\r\n--x\r\n", b"=?utf-8?q?=C3?=",
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(raw)))
        span = draw(st.integers(0, 200))
        kind = draw(st.sampled_from(["insert", "delete", "flip", "repeat", "truncate"]))
        if kind == "insert":
            raw[at:at] = draw(st.sampled_from(HOSTILE_BYTES))
        elif kind == "delete":
            del raw[at : at + span]
        elif kind == "flip" and at < len(raw):
            raw[at] = draw(st.integers(0, 255))
        elif kind == "repeat":
            raw[at:at] = bytes(raw[at : at + span]) * draw(st.integers(1, 2000))
        elif kind == "truncate":
            del raw[at:]
    return bytes(raw[:2_000_000])


@cases(150)
@given(raw=mutated())
def test_a_mutated_real_reply_parses_within_bounds(raw: bytes) -> None:
    assert_bounded(parse(raw))


# --- property-based: the strict From reader against the stdlib's --------------------------

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
ATOMS = st.text(alphabet=ALNUM + "!#$%&'*+-/^_`{|}~", min_size=1, max_size=8)
LABELS = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?", fullmatch=True)
DOMAINS = st.lists(LABELS, min_size=2, max_size=3).map(".".join)
QUOTED_TEXT = st.text(alphabet=ALNUM + " @<>,;:.()[]\"\\'", min_size=1, max_size=12)
NAME_WORDS = st.one_of(st.text(alphabet=ALNUM, min_size=1, max_size=8), QUOTED_TEXT.map(lambda t: quote(t)))  # fmt: skip
COMMENTS = st.text(alphabet=ALNUM + ' @<>,;:."', max_size=12).map(lambda t: f"({t})")


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def addr_specs(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        local = ".".join(draw(st.lists(ATOMS, min_size=1, max_size=3)))
    else:  # quoted, holding what needs quotes
        local = quote(draw(st.text(alphabet=ALNUM, max_size=4)) + " " + draw(QUOTED_TEXT))
    return f"{local}@{draw(DOMAINS)}"


@st.composite
def mailboxes(draw: st.DrawFn) -> tuple[str, str]:
    """A well-formed From field body and its addr-spec, with names and comments around it."""
    address = draw(addr_specs())
    names = " ".join(draw(st.lists(NAME_WORDS, min_size=0, max_size=3)))
    before = draw(st.sampled_from(["", " "])) + draw(st.one_of(st.just(""), COMMENTS))
    after = draw(st.one_of(st.just(""), COMMENTS.map(lambda c: " " + c)))
    if names or draw(st.booleans()):
        return f"{before}{names} <{address}>{after}", address
    return f"{before} {address}{after}", address


def stdlib_reading(field: str) -> str | None:
    """The addr-spec the stdlib's policy.default reads, if it sees one mailbox and no defect."""
    header = email.policy.default.header_factory("From", field)
    if header.defects or len(header.addresses) != 1:
        return None
    address = header.addresses[0]
    return f"{address.addr_spec.rpartition('@')[0]}@{address.domain.lower()}"


@cases(300)
@given(case=mailboxes())
def test_a_well_formed_mailbox_reads_as_the_stdlib_reads_it(case: tuple[str, str]) -> None:
    field, _ = case
    expected = stdlib_reading(field)

    assert expected is not None, "the generator wrote a mailbox the stdlib finds defective"
    assert mailbox(field.encode()) == expected


DECOY = "boss@corp.example"
SPOOFS = [
    "{decoy} <{real}>", '"{decoy}" <{real}>', "({decoy}) {real}", "{real} ({decoy})",
    "=?utf-8?q?{decoy_q}?= <{real}>", "{decoy}, {real}", "{real}, {decoy}", "x: {decoy};",
    "{decoy} {real}", "<{decoy}> <{real}>", '"{decoy}"@x.example', "{real} <{decoy}",
    "=?utf-8?b?{decoy_b}?= <{real}>", "Boss <{real}> ({decoy})", "{decoy}\r\n <{real}>",
]  # fmt: skip


@cases(300)
@given(real=addr_specs(), template=st.sampled_from(SPOOFS), noise=COMMENTS)
def test_an_address_in_a_display_name_or_comment_is_never_taken_for_the_sender(
    real: str, template: str, noise: str
) -> None:
    assume(real.lower() != DECOY)
    field = template.format(
        decoy=DECOY,
        real=real,
        decoy_q=DECOY.replace("@", "=40").replace(".", "=2E"),
        decoy_b=base64.b64encode(DECOY.encode()).decode(),
    )
    for written in (field, f"{noise} {field}", f"{field} {noise}"):
        try:
            address = mailbox(written.encode())
        except BadSender:
            continue
        assert address != DECOY
        assert (
            address.endswith("@x.example")
            or address.rpartition("@")[2] == real.rpartition("@")[2].lower()
        )


HEADER_LINES = st.sampled_from(
    [
        b"From: Jane <jane@example.org>", b"from : mallory@x.example", b"FROM:boss@corp.example",
        b"Subject: hi", b" folded continuation", b"\tfolded <boss@corp.example>", b"X: a\rFrom: b@c",
        b"To: reply+t@reply.example.com", b"not a header", b"From: a@b.example\x00", b"",
        b"Received: from x (boss@corp.example)", b"From: =?utf-8?q?a=40b?= <c@d.example>",
    ]
)  # fmt: skip


@cases(300)
@given(lines=st.lists(HEADER_LINES, max_size=8), crlf=st.booleans())
def test_a_header_section_yields_one_from_of_its_own_or_a_refusal(
    lines: list[bytes], crlf: bool
) -> None:
    raw = (b"\r\n" if crlf else b"\n").join(lines) + b"\r\n\r\nFrom: body@x.example\r\n"
    try:
        address = sender_of(raw)
    except BadSender:
        return
    header_lines = lines[: lines.index(b"")] if b"" in lines else lines
    froms = [line for line in header_lines if line.lower().startswith(b"from")]
    assert len(froms) == 1
    assert address.encode() in froms[0]
