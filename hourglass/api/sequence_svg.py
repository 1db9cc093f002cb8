"""Sequence diagrams drawn by Hourglass itself: the Mermaid ``sequenceDiagram`` text of a
recommendation's ``design.sequence`` as an inline ``<svg>`` (no script, no external resource).

Only the subset :mod:`hourglass.analysis.sequence` writes (and the common core of Mermaid) is understood:
``participant ID as Name`` / ``actor``, ``A->>B: text`` (call), ``A-->>B: text`` (return),
``A->B`` / ``A-->B`` (open arrows), ``Note over A[,B]: text`` / ``Note left of`` / ``right of``,
``par`` / ``and``, ``loop``, ``alt`` / ``else``, ``opt``, ``critical``, ``break``, ``rect`` and
``end``. Anything else (``activate``, ``autonumber``, comments) is skipped, never an error.
Participants not declared appear in order of first use, as Mermaid does. The entity codes
``#35;`` and ``#59;`` (and any ``#NNN;``) are decoded. Every text is HTML-escaped before it enters
the SVG.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

COLUMN = 170  # distance between lifelines
TOP = 8
HEAD_H = 30
ROW_H = 26
NOTE_H = 24
BLOCK_H = 22
MARGIN_X = 24
CHAR_W = 6.1  # average glyph width at 11px, for truncation

_PARTICIPANT = re.compile(r"^(participant|actor)\s+(.+?)(?:\s+as\s+(.+))?$", re.I)
_MESSAGE = re.compile(
    r"^([^\s\-<>][^-<>]*?)\s*(-->>|->>|-->|->|--x|-x|--\)|-\))\s*([+-]?)([^:]+?)\s*:\s*(.*)$"
)
_NOTE = re.compile(r"^note\s+(over|left of|right of)\s+([^:]+):\s*(.*)$", re.I)
_BLOCK = re.compile(r"^(par|loop|alt|opt|critical|break|rect)\b\s*(.*)$", re.I)
_SEPARATOR = re.compile(r"^(and|else|option)\b\s*(.*)$", re.I)
_ENTITY = re.compile(r"#(\d{1,6});")


def _decode(text: str) -> str:
    return _ENTITY.sub(lambda m: chr(int(m.group(1))) if int(m.group(1)) < 0x110000 else "", text).strip()


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _truncate(text: str, chars: int) -> str:
    chars = max(chars, 4)
    return text if len(text) <= chars else text[: chars - 1] + "…"


@dataclass
class Step:
    kind: str  # message | note | block | separator | end
    source: str = ""
    target: str = ""
    text: str = ""
    dashed: bool = False
    over: tuple[str, ...] = ()
    placement: str = "over"


@dataclass
class Sequence:
    participants: list[str] = field(default_factory=list)  # ids in order
    names: dict[str, str] = field(default_factory=dict)  # id -> display name
    steps: list[Step] = field(default_factory=list)

    def ensure(self, pid: str) -> None:
        if pid not in self.names:
            self.participants.append(pid)
            self.names[pid] = _decode(pid)

    def display_names(self) -> list[str]:
        return [self.names[p] for p in self.participants]


def parse(text: str) -> Sequence:
    """The diagram's participants and steps (see the module docstring)."""
    seq = Sequence()
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line or line.startswith("%%") or line.lower() == "sequencediagram":
            continue
        m = _PARTICIPANT.match(line)
        if m:
            pid = m.group(2).strip()
            if pid not in seq.names:
                seq.participants.append(pid)
            seq.names[pid] = _decode(m.group(3) or pid)
            continue
        m = _NOTE.match(line)
        if m:
            over = tuple(p.strip() for p in m.group(2).split(",") if p.strip())
            for p in over:
                seq.ensure(p)
            seq.steps.append(Step("note", text=_decode(m.group(3)), over=over, placement=m.group(1).lower()))
            continue
        if line.lower() == "end":
            seq.steps.append(Step("end"))
            continue
        m = _BLOCK.match(line)
        if m:
            seq.steps.append(Step("block", text=f"{m.group(1).lower()} {_decode(m.group(2))}".strip()))
            continue
        m = _SEPARATOR.match(line)
        if m:
            seq.steps.append(Step("separator", text=_decode(m.group(2))))
            continue
        m = _MESSAGE.match(line)
        if m:
            source, arrow, target = m.group(1).strip(), m.group(2), m.group(4).strip()
            seq.ensure(source)
            seq.ensure(target)
            seq.steps.append(
                Step("message", source, target, _decode(m.group(5)), dashed=arrow.startswith("--"))
            )
    return seq


def render_sequence_svg(text: str, *, figure_id: str, title: str = "") -> str:
    """The diagram as an inline ``<svg class="sequence">``; an empty string when it has no participant."""
    seq = parse(text)
    if not seq.participants:
        return ""
    n = len(seq.participants)
    x_of = {p: MARGIN_X + 70 + i * COLUMN for i, p in enumerate(seq.participants)}
    width = MARGIN_X * 2 + 140 + (n - 1) * COLUMN + 150  # room for self-calls on the right
    title_h = 18 if title else 0
    y = TOP + title_h + HEAD_H + 14
    body: list[str] = []
    blocks: list[tuple[int, float, str, list[float]]] = []  # (depth, top, label, separators)
    for step in seq.steps:
        if step.kind == "block":
            blocks.append((len(blocks), y, step.text, []))
            y += BLOCK_H
        elif step.kind == "separator":
            if blocks:
                blocks[-1][3].append(y)
                if step.text:
                    body.append(
                        f'<text class="seq-block-label" x="{MARGIN_X + 12 + 6 * blocks[-1][0]}" y="{y + 13}">'
                        f"[{esc(_truncate(step.text, 40))}]</text>"
                    )
            y += BLOCK_H - 6
        elif step.kind == "end":
            if blocks:
                depth, top, label, seps = blocks.pop()
                left = MARGIN_X + 4 + 6 * depth
                right = width - MARGIN_X - 4 - 6 * depth
                bottom = y + 4
                kind, _, rest = label.partition(" ")
                tab = max(40.0, 12 + 6.6 * len(kind))
                body.insert(
                    0,
                    f'<g class="seq-block seq-block-{esc(kind)}"><rect x="{left}" y="{top}" width="{right - left}" '
                    f'height="{bottom - top}" rx="3"/>'
                    f'<path class="seq-block-tab" d="M{left} {top}h{tab:.1f}v12l-6 6H{left}z"/>'
                    f'<text class="seq-block-kind" x="{left + 4}" y="{top + 13}">{esc(kind)}</text>'
                    f'<text class="seq-block-label" x="{left + tab + 6:.1f}" y="{top + 13}">'
                    f"{esc(_truncate(rest, 70))}</text>"
                    + "".join(
                        f'<line class="seq-block-sep" x1="{left}" y1="{s}" x2="{right}" y2="{s}"/>'
                        for s in seps
                    )
                    + "</g>",
                )
                y += 10
        elif step.kind == "note":
            xs = [float(x_of[p]) for p in step.over if p in x_of] or [float(x_of[seq.participants[0]])]
            if step.placement == "left of":
                nl, nr = min(xs) - COLUMN + 20, min(xs) - 10
            elif step.placement == "right of":
                nl, nr = max(xs) + 10, max(xs) + COLUMN - 20
            else:
                nl, nr = min(xs) - 60, max(xs) + 60
                if nr - nl < 160:
                    nr = nl + max(160, CHAR_W * len(step.text) + 16)
            nr = min(nr, width - 4)
            chars = int((nr - nl - 12) / CHAR_W)
            body.append(
                f'<g class="seq-note"><title>{esc(step.text)}</title><rect x="{nl:.1f}" y="{y}" '
                f'width="{nr - nl:.1f}" height="{NOTE_H - 4}" rx="2"/>'
                f'<text x="{nl + 6:.1f}" y="{y + 14}">{esc(_truncate(step.text, chars))}</text></g>'
            )
            y += NOTE_H
        elif step.kind == "message":
            x1, x2 = x_of[step.source], x_of[step.target]
            cls = "seq-msg seq-return" if step.dashed else "seq-msg seq-call"
            if x1 == x2:  # a call to itself: a loop on the right of the lifeline
                chars = int((COLUMN - 20) / CHAR_W)
                body.append(
                    f'<g class="{cls}"><title>{esc(step.text)}</title>'
                    f'<path d="M{x1} {y + 8}h30v12h-28" marker-end="url(#{esc(figure_id)}-arrow)"/>'
                    f'<text x="{x1 + 36}" y="{y + 18}">{esc(_truncate(step.text, chars))}</text></g>'
                )
                y += ROW_H + 6
                continue
            chars = max(int((abs(x2 - x1) - 10) / CHAR_W), 40)  # may run past a lifeline, as in Mermaid
            body.append(
                f'<g class="{cls}"><title>{esc(step.text)}</title>'
                f'<line x1="{x1}" y1="{y + 16}" x2="{x2 - 3 if x2 > x1 else x2 + 3}" y2="{y + 16}" '
                f'marker-end="url(#{esc(figure_id)}-arrow)"/>'
                f'<text x="{(x1 + x2) / 2:.1f}" y="{y + 11}" text-anchor="middle">'
                f"{esc(_truncate(step.text, chars))}</text></g>"
            )
            y += ROW_H
    while blocks:  # an unclosed block: close it at the bottom
        depth, top, label, _ = blocks.pop()
        body.insert(
            0,
            f'<g class="seq-block"><rect x="{MARGIN_X + 4 + 6 * depth}" y="{top}" '
            f'width="{width - 2 * MARGIN_X - 8 - 12 * depth}" height="{y - top + 4}" rx="3"/></g>',
        )
    height = y + 12 + HEAD_H
    head_y = TOP + title_h
    out = [
        f'<svg class="sequence" id="{esc(figure_id)}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc("Sequence diagram: " + ", ".join(seq.display_names()))}">',
        f'<defs><marker id="{esc(figure_id)}-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0 0L10 5L0 10z" fill="#394150"/></marker></defs>',
    ]
    if title:
        out.append(f'<text class="seq-title" x="{MARGIN_X}" y="{TOP + 12}">{esc(title)}</text>')
    for p in seq.participants:  # lifelines under everything
        x = x_of[p]
        out.append(
            f'<line class="seq-lifeline" x1="{x}" y1="{head_y + HEAD_H}" x2="{x}" y2="{height - HEAD_H - 6}"/>'
        )
    out.extend(body)
    chars = int((COLUMN - 16) / CHAR_W)
    for p in seq.participants:
        x = x_of[p]
        name = seq.names[p]
        for top in (head_y, height - HEAD_H - 4):
            out.append(
                f'<g class="seq-participant"><title>{esc(name)}</title>'
                f'<rect x="{x - (COLUMN - 14) / 2:.1f}" y="{top}" width="{COLUMN - 14}" height="{HEAD_H - 6}" rx="4"/>'
                f'<text x="{x}" y="{top + 16}" text-anchor="middle">{esc(_truncate(name, chars))}</text></g>'
            )
    out.append("</svg>")
    return "".join(out)


SEQUENCE_CSS = """
svg.sequence { display:block; font-family:inherit; background:#fff; border:1px solid var(--line); border-radius:6px; }
svg.sequence .seq-title { font-size:13px; font-weight:600; fill:#1d2330; }
svg.sequence .seq-lifeline { stroke:#9aa3b2; stroke-width:1; stroke-dasharray:4 3; }
svg.sequence .seq-participant rect { fill:#eef1f6; stroke:#394150; stroke-width:1; }
svg.sequence .seq-participant text { font-size:11.5px; font-weight:600; fill:#1d2330; }
svg.sequence .seq-msg line, svg.sequence .seq-msg path { stroke:#394150; stroke-width:1.2; fill:none; }
svg.sequence .seq-return line { stroke-dasharray:4 3; stroke:#7b8394; }
svg.sequence .seq-msg text { font-size:11px; fill:#1d2330; }
svg.sequence .seq-return text { fill:#5b6475; }
svg.sequence .seq-note rect { fill:#fff8db; stroke:#d9c36a; }
svg.sequence .seq-note text { font-size:11px; fill:#1d2330; }
svg.sequence .seq-block rect { fill:rgba(59,91,219,.04); stroke:#8a93a6; stroke-width:1; }
svg.sequence .seq-block-par rect { fill:rgba(47,158,68,.06); stroke:#2f9e44; }
svg.sequence .seq-block-tab { fill:#e3e7ee; stroke:#8a93a6; }
svg.sequence .seq-block-kind { font-size:10.5px; font-weight:700; fill:#1d2330; }
svg.sequence .seq-block-label { font-size:10.5px; fill:#394150; }
svg.sequence .seq-block-sep { stroke:#8a93a6; stroke-dasharray:5 3; }
"""
