"""The output grammar of Rex-Omni as a per-sequence state machine over generated token ids.

The decode loop asks ``next()`` what may come next and feeds every generated id to
``advance(id)``, which returns the detections that id completed. Two cores implement the
same machine: the C extension ``rexedge.runtime.decode._grammar`` (the default, for the decode
loop) and ``ReferenceGrammarCore`` below (plain Python, the reference the C core is tested
against). ``Grammar`` wraps either one and turns completed geometries into ``Detection``s.

Grammar (docs/model.md, "Output grammar")::

    response ::= [ group { ", " group } ] <|im_end|>
    group    ::= <|object_ref_start|> phrase <|object_ref_end|> <|box_start|> payload <|box_end|>
    payload  ::= "None" | geom { "," geom }
    geom     ::= 4 coords (box) | 2 coords (point) | an even number >= 6 of coords (polygon)

``next()`` returns ``(kind, ids)``, one tuple cached per state (nothing is allocated per
token):

- ``FREE, ids``: phrase text: any token that is neither a coordinate nor a special
  token, or one of ``ids`` (<|object_ref_end|>, which closes the phrase).
- ``FREE, ()``: any token at all (the keypoint answer, whose JSON holds coordinates).
- ``COORD, extra``: a coordinate token, or one of ``extra``: the first id of "None"
  right after <|box_start|>; "," and <|box_end|> once a polygon is closable.
- ``CHOICE, ids``: exactly one of ``ids`` (e.g. "," or <|box_end|> after a complete box).
- ``FORCED, ids``: ``ids`` must follow in this order (jump-forward may append them all).
- ``DONE, ()``: the response ended.

``coord_range()`` returns ``(start, stop)``: the coordinate token ids the next coordinate may
take so that a box is well-ordered (structured decoding restricts the head to them; exact
mode ignores them and the grammar accepts any order). For the 1st and 2nd coordinate of a
box (x0, y0) it is <0>..<998>, so that x1 > x0 and y1 > y0 always have room; for the 3rd
(x1) <x0+1>..<999>, for the 4th (y1) <y0+1>..<999>. Points, polygons and every other state:
all 1,000. (A box fed out of order, x0 = <999>, gets <999> alone: never empty.)

When things complete:

- A box is emitted by its 4th coordinate, a point by its 2nd; a polygon by the "," or
  <|box_end|> that closes it (only then is its length known).
- A "None" payload emits no detection; its phrase joins ``absent`` at the <|box_end|>.

Recovery rules for malformed output (C and Python follow them identically):

1. <|im_end|> or <|endoftext|> anywhere ends the response (``DONE``); an unfinished
   geometry or group is dropped. After ``DONE`` every id is ignored.
2. <|object_ref_start|> anywhere starts a new group (inside a phrase too: the phrase
   restarts); an unfinished geometry is dropped.
3. Inside a phrase every other id is text (commas, specials, coordinate tokens
   included), except an id outside 0..2**31-1, which can be no token and counts as
   rule 4. Only the first ``max_phrase_ids`` (256) ids are kept; once the phrase holds
   that many, ``next()`` forces <|object_ref_end|>, and further ids (if a caller feeds
   them anyway) are consumed without being stored.
4. Any other id that ``next()`` did not allow (text where a coordinate belongs, a 5th
   coordinate, a special in a payload, an empty payload, a negative or too large id)
   drops the unfinished geometry and skips every id up to the next
   <|object_ref_start|> (rule 2) or end (rule 1). Detections emitted before stay. While
   skipping, ``next()`` offers the two ways back: CHOICE of <|object_ref_start|> and
   <|im_end|>.
5. A polygon holds at most ``max_polygon_coords`` (512) coordinates; at that length
   ``next()`` allows only "," or <|box_end|>, and one more coordinate is rule 4.
6. Keypoint answers (JSON in a fence) are FREE text up to the end; the grammar emits
   nothing for them (the text is parsed once generation ends).
"""

from __future__ import annotations

import operator
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, Callable, Sequence

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.results.detections import Detection

if TYPE_CHECKING:
    from rexedge.runtime.request.tokenizer import TokenIds

MAX_PHRASE_IDS = 256
MAX_POLYGON_COORDS = 512
POLYGON_MIN_COORDS = 6
# Ids are stored in 32 bits by the C core; anything outside this range is no token.
MAX_TOKEN_ID = 2**31 - 1


class NextKind(IntEnum):
    """What ``next()`` allows; also the decode loop's step kinds (``label`` names them in step counts).

    The C core takes these members in ``kinds`` and returns them, in this order (its KIND_* codes)."""

    FREE = 0
    COORD = 1
    CHOICE = 2
    FORCED = 3
    DONE = 4

    @property
    def label(self) -> str:
        """The kind's name in ``Generation.steps`` and the benchmarks' step records."""
        return self.name.lower()


FREE, COORD, CHOICE, FORCED, DONE = NextKind


class Geometry(IntEnum):
    """What one payload item is; the int values are the C core's geometry codes."""

    BOX = 0
    POINT = 1
    POLYGON = 2
    TEXT = 3  # keypoint: free text, parsed after generation


GEOMETRY_OF_TASK: dict[str, Geometry] = {
    "detection": Geometry.BOX,
    "visual_prompting": Geometry.BOX,
    "gui_grounding": Geometry.BOX,
    "ocr_box": Geometry.BOX,
    "pointing": Geometry.POINT,
    "gui_pointing": Geometry.POINT,
    "ocr_polygon": Geometry.POLYGON,
    "keypoint": Geometry.TEXT,
}

DETECTION_KIND = {Geometry.BOX: "box", Geometry.POINT: "point", Geometry.POLYGON: "polygon"}
COORDS_PER_GEOMETRY = {Geometry.BOX: 4, Geometry.POINT: 2}

IMPLEMENTATIONS = ("c", "python")


class GrammarConfigError(RexEdgeError):
    """The grammar cannot be built from the given task, token ids or image size."""


# A phrase and the bins of one completed geometry; empty bins mean the phrase was answered "None".
CoreEvent = tuple[tuple[int, ...], tuple[int, ...]]


class _State(Enum):
    START = "start"                  # before the first group
    PHRASE = "phrase"                # after <|object_ref_start|>
    AFTER_PHRASE = "after_phrase"    # after <|object_ref_end|>
    PAYLOAD_START = "payload_start"  # after <|box_start|>
    NONE = "none"                    # inside the ids of "None"
    GEOM = "geom"                    # inside a geometry (or right after a "," between two)
    AFTER_GEOM = "after_geom"        # a box or point is complete
    AFTER_GROUP = "after_group"      # after <|box_end|>
    SEP_SPACE = "sep_space"          # after the "," that follows <|box_end|>
    SEP_OPEN = "sep_open"            # after ", "
    SKIP = "skip"                    # malformed: waiting for a new group or the end
    TEXT = "text"                    # keypoint answer
    DONE = "done"


class ReferenceGrammarCore:
    """The grammar in plain Python, written for clarity; the C core must behave identically.

    ``next()`` returns the cached ``(kind, ids)`` of the current state; ``advance(id)``
    returns ``None`` or a ``CoreEvent``. The arguments are the C core's, in its order.
    """

    def __init__(
        self,
        geometry: int,
        coord_start: int,
        num_coords: int,
        endoftext: int,
        im_end: int,
        object_ref_start: int,
        object_ref_end: int,
        box_start: int,
        box_end: int,
        comma: int,
        space: int,
        none: Sequence[int],
        max_phrase_ids: int,
        max_polygon_coords: int,
        kinds: Sequence[Any] = tuple(NextKind),
    ) -> None:
        _check_core_arguments(geometry, coord_start, num_coords, endoftext, im_end, object_ref_start,
                              object_ref_end, box_start, box_end, comma, space, none,
                              max_phrase_ids, max_polygon_coords, kinds)
        self._geometry = Geometry(geometry)
        self._coord_start = coord_start
        self._coord_stop = coord_start + num_coords
        self._ends = (endoftext, im_end)
        self._object_ref_start = object_ref_start
        self._object_ref_end = object_ref_end
        self._box_start = box_start
        self._box_end = box_end
        self._comma = comma
        self._space = space
        self._none = tuple(none)
        self._max_phrase_ids = max_phrase_ids
        self._max_polygon_coords = max_polygon_coords

        free, coord, choice, forced, done = kinds
        self._next_free = (free, ())
        self._next_phrase = (free, (object_ref_end,))
        self._next_done = (done, ())
        self._next_open = (choice, (object_ref_start, im_end))
        self._next_after_group = (choice, (comma, im_end))
        self._next_after_geom = (choice, (comma, box_end))
        self._next_coord = (coord, ())
        self._next_coord_or_none = (coord, (self._none[0],))
        self._next_coord_or_close = (coord, (comma, box_end))
        self._next_close_phrase = (forced, (object_ref_end,))
        self._next_box_start = (forced, (box_start,))
        self._next_sep_space = (forced, (space, object_ref_start))
        self._next_sep_open = (forced, (object_ref_start,))
        # indexed by how many ids of "None" have been seen (1 .. len)
        self._next_none_rest = [(forced, self._none[matched:] + (box_end,)) for matched in range(len(self._none) + 1)]
        self.reset()

    def reset(self) -> None:
        self._state = _State.TEXT if self._geometry is Geometry.TEXT else _State.START
        self._start_group_buffers()

    def _start_group_buffers(self) -> None:
        self._phrase: list[int] = []
        self._phrase_ids: tuple[int, ...] | None = None  # built once per group, on its first event
        self._bins: list[int] = []
        self._none_matched = 0

    def next(self) -> tuple[Any, tuple[int, ...]]:
        state = self._state
        if state in (_State.START, _State.SKIP):
            return self._next_open
        if state is _State.PHRASE:
            return self._next_close_phrase if len(self._phrase) >= self._max_phrase_ids else self._next_phrase
        if state is _State.TEXT:
            return self._next_free
        if state is _State.AFTER_PHRASE:
            return self._next_box_start
        if state is _State.PAYLOAD_START:
            return self._next_coord_or_none
        if state is _State.NONE:
            return self._next_none_rest[self._none_matched]
        if state is _State.GEOM:
            if self._polygon_closable():
                if len(self._bins) < self._max_polygon_coords:
                    return self._next_coord_or_close
                return self._next_after_geom
            return self._next_coord
        if state is _State.AFTER_GEOM:
            return self._next_after_geom
        if state is _State.AFTER_GROUP:
            return self._next_after_group
        if state is _State.SEP_SPACE:
            return self._next_sep_space
        if state is _State.SEP_OPEN:
            return self._next_sep_open
        return self._next_done

    def coord_range(self) -> tuple[int, int]:
        start, stop = self._coord_start, self._coord_stop
        if self._geometry is not Geometry.BOX or self._state not in (_State.PAYLOAD_START, _State.GEOM):
            return start, stop
        slot = len(self._bins) if self._state is _State.GEOM else 0
        if slot < 2:
            return start, stop - 1
        return min(start + self._bins[slot - 2] + 1, stop - 1), stop

    def advance(self, token_id: int) -> CoreEvent | None:
        token = operator.index(token_id)
        state = self._state
        if state is _State.DONE:
            return None
        if token in self._ends:
            self._state = _State.DONE
            return None
        if state is _State.TEXT:
            return None
        if token == self._object_ref_start:
            self._state = _State.PHRASE
            self._start_group_buffers()
            return None

        if state is _State.PHRASE:
            if token == self._object_ref_end:
                self._state = _State.AFTER_PHRASE
            elif not 0 <= token <= MAX_TOKEN_ID:
                self._state = _State.SKIP
            elif len(self._phrase) < self._max_phrase_ids:
                self._phrase.append(token)
            return None
        if state is _State.AFTER_PHRASE:
            self._state = _State.PAYLOAD_START if token == self._box_start else _State.SKIP
            return None
        if state is _State.PAYLOAD_START:
            if token == self._none[0]:
                self._state = _State.NONE
                self._none_matched = 1
                return None
            if self._is_coord(token):
                self._state = _State.GEOM
                return self._advance_geometry(token)
            self._state = _State.SKIP
            return None
        if state is _State.NONE:
            return self._advance_none(token)
        if state is _State.GEOM:
            return self._advance_geometry(token)
        if state is _State.AFTER_GEOM:
            if token == self._comma:
                self._state = _State.GEOM
                self._bins = []
            elif token == self._box_end:
                self._state = _State.AFTER_GROUP
            else:
                self._state = _State.SKIP
            return None
        if state is _State.AFTER_GROUP:
            self._state = _State.SEP_SPACE if token == self._comma else _State.SKIP
            return None
        if state is _State.SEP_SPACE:
            self._state = _State.SEP_OPEN if token == self._space else _State.SKIP
            return None
        # START, SEP_OPEN and SKIP accept only what was handled above (a new group, the end)
        self._state = _State.SKIP
        return None

    def _advance_none(self, token: int) -> CoreEvent | None:
        if self._none_matched < len(self._none):
            if token == self._none[self._none_matched]:
                self._none_matched += 1
            else:
                self._state = _State.SKIP
            return None
        if token == self._box_end:
            self._state = _State.AFTER_GROUP
            return self._event()
        self._state = _State.SKIP
        return None

    def _advance_geometry(self, token: int) -> CoreEvent | None:
        if self._is_coord(token):
            if self._geometry is Geometry.POLYGON:
                if len(self._bins) < self._max_polygon_coords:
                    self._bins.append(token - self._coord_start)
                else:
                    self._state = _State.SKIP
                return None
            self._bins.append(token - self._coord_start)
            if len(self._bins) == COORDS_PER_GEOMETRY[self._geometry]:
                self._state = _State.AFTER_GEOM
                return self._event()
            return None
        if self._polygon_closable() and token in (self._comma, self._box_end):
            event = self._event()
            self._bins = []
            if token == self._box_end:
                self._state = _State.AFTER_GROUP
            return event
        self._state = _State.SKIP
        return None

    def _polygon_closable(self) -> bool:
        count = len(self._bins)
        return self._geometry is Geometry.POLYGON and count >= POLYGON_MIN_COORDS and count % 2 == 0

    def _is_coord(self, token: int) -> bool:
        return self._coord_start <= token < self._coord_stop

    def _event(self) -> CoreEvent:
        if self._phrase_ids is None:
            self._phrase_ids = tuple(self._phrase)
        return self._phrase_ids, tuple(self._bins)


def _check_core_arguments(geometry: int, coord_start: int, num_coords: int, endoftext: int, im_end: int,
                          object_ref_start: int, object_ref_end: int, box_start: int, box_end: int,
                          comma: int, space: int, none: Sequence[int], max_phrase_ids: int,
                          max_polygon_coords: int, kinds: Sequence[Any]) -> None:
    """The C core's own argument checks (ValueError), so both cores refuse the same things."""
    if geometry not in tuple(Geometry):
        raise ValueError(f"geometry must be one of {[int(g) for g in Geometry]}, got {geometry}")
    if num_coords < 1 or not 0 <= coord_start <= MAX_TOKEN_ID - num_coords:
        raise ValueError(f"coordinate ids {coord_start} + {num_coords} do not fit in 0..{MAX_TOKEN_ID}")
    special = (endoftext, im_end, object_ref_start, object_ref_end, box_start, box_end, comma, space)
    if not all(0 <= i <= MAX_TOKEN_ID for i in special + tuple(none)):
        raise ValueError(f"token ids must be in 0..{MAX_TOKEN_ID}")
    if not 1 <= len(none) <= 16:
        raise ValueError(f'"None" must be 1 to 16 ids, got {len(none)}')
    if max_phrase_ids < 1:
        raise ValueError(f"max_phrase_ids must be >= 1, got {max_phrase_ids}")
    if max_polygon_coords < POLYGON_MIN_COORDS or max_polygon_coords % 2:
        raise ValueError(f"max_polygon_coords must be even and >= {POLYGON_MIN_COORDS}, got {max_polygon_coords}")
    if len(kinds) != len(NextKind):
        raise ValueError(f"kinds must hold {len(NextKind)} objects, got {len(kinds)}")


class Grammar:
    """The grammar of one response: ``next()``, ``coord_range()``, ``advance(id)``, ``detections``, ``absent``,
    ``reset()``.

    ``next()`` and ``coord_range()`` are the core's own methods (no Python frame in between: it runs once per
    generated token). ``advance`` returns the ``Detection``s the id completed (an empty
    tuple nearly always).
    """

    next: Callable[[], tuple[NextKind, tuple[int, ...]]]
    coord_range: Callable[[], tuple[int, int]]

    def __init__(self, core: Any, geometry: Geometry, image_size: tuple[int, int],
                 decode: Callable[[list[int]], str]) -> None:
        self._core = core
        self._kind = DETECTION_KIND.get(geometry, "")
        self._width, self._height = image_size
        self._decode = decode
        self.next = core.next
        self.coord_range = core.coord_range
        self._core_advance = core.advance
        self._detections: list[Detection] = []
        self._absent: list[str] = []
        self._last_phrase: tuple[tuple[int, ...], str] | None = None

    @property
    def detections(self) -> list[Detection]:
        """Every detection completed so far, in output order."""
        return list(self._detections)

    @property
    def absent(self) -> list[str]:
        """Phrases the model answered with "None", in output order."""
        return list(self._absent)

    def reset(self) -> None:
        """Forget everything: ready for a new response."""
        self._core.reset()
        self._detections.clear()
        self._absent.clear()
        self._last_phrase = None

    def advance(self, token_id: int) -> tuple[Detection, ...]:
        event = self._core_advance(token_id)
        if event is None:
            return ()
        phrase_ids, bins = event
        phrase = self._phrase_text(phrase_ids)
        if not bins:
            self._absent.append(phrase)
            return ()
        detection = Detection(kind=self._kind, phrase=phrase, bins=bins, coords=self._to_pixels(bins))
        self._detections.append(detection)
        return (detection,)

    def _phrase_text(self, phrase_ids: tuple[int, ...]) -> str:
        # every geometry of a group carries the same phrase: decode it once
        if self._last_phrase is None or self._last_phrase[0] != phrase_ids:
            self._last_phrase = (phrase_ids, self._decode(list(phrase_ids)))
        return self._last_phrase[1]

    def _to_pixels(self, bins: tuple[int, ...]) -> tuple[float, ...]:
        sizes = (self._width, self._height)
        return tuple(b / 999 * sizes[i % 2] for i, b in enumerate(bins))


def make_grammar(task: str, ids: TokenIds, image_size: tuple[int, int], impl: str = "c", *,
                 decode: Callable[[list[int]], str]) -> Grammar:
    """The grammar of one ``task``'s response.

    ``ids``: the tokenizer's ``TokenIds``; ``image_size``: (width, height) of the ORIGINAL
    image (PIL's ``Image.size``), for pixel coordinates; ``impl``: "c" (the extension) or
    "python" (the reference); ``decode``: phrase ids -> text (the tokenizer's decode).
    """
    if task not in GEOMETRY_OF_TASK:
        raise GrammarConfigError(f"unknown task {task!r}: expected one of {', '.join(GEOMETRY_OF_TASK)}")
    if impl not in IMPLEMENTATIONS:
        raise GrammarConfigError(f"unknown grammar impl {impl!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    _check_image_size(image_size)
    _check_token_ids(ids)
    geometry = GEOMETRY_OF_TASK[task]
    core_class = ReferenceGrammarCore if impl == "python" else _c_core_class()
    core = core_class(int(geometry), ids.coord_start, ids.num_coords, ids.endoftext, ids.im_end,
                      ids.object_ref_start, ids.object_ref_end, ids.box_start, ids.box_end, ids.comma,
                      ids.space, tuple(ids.none), MAX_PHRASE_IDS, MAX_POLYGON_COORDS, tuple(NextKind))
    return Grammar(core, geometry, (int(image_size[0]), int(image_size[1])), decode)


def _c_core_class() -> type:
    try:
        from rexedge.runtime.decode._grammar import GrammarCore
    except ImportError as error:
        raise GrammarConfigError(
            f"the C grammar extension is not built ({error}): run `pip install -e .` with a C compiler, "
            'or pass impl="python"') from error
    return GrammarCore


def _check_image_size(image_size: tuple[int, int]) -> None:
    try:
        width, height = image_size
        valid = all(operator.index(side) > 0 for side in (width, height))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise GrammarConfigError(f"image_size must be (width, height) as two positive integers, got {image_size!r}")


def _check_token_ids(ids: TokenIds) -> None:
    """The grammar tells tokens apart by id: its structural ids must be distinct and not coordinates."""
    names = ("endoftext", "im_end", "object_ref_start", "object_ref_end", "box_start", "box_end", "comma", "space")
    try:
        structural = {name: operator.index(getattr(ids, name)) for name in names}
        none = tuple(operator.index(i) for i in ids.none)
        coord_start, num_coords = operator.index(ids.coord_start), operator.index(ids.num_coords)
    except (AttributeError, TypeError) as error:
        raise GrammarConfigError(f"token ids: expected a TokenIds with integer ids ({error})") from error
    if num_coords != 1000:
        raise GrammarConfigError(f"token ids: expected 1000 coordinate tokens <0>..<999>, got {num_coords}")
    if not 0 <= coord_start <= MAX_TOKEN_ID - num_coords:
        raise GrammarConfigError(f"token ids: coordinate range starting at {coord_start} is out of range")
    if not 1 <= len(none) <= 16:
        raise GrammarConfigError(f'token ids: "None" must be 1 to 16 ids, got {none!r}')
    for name, value in [*structural.items(), *((f"none[{k}]", v) for k, v in enumerate(none))]:
        if not 0 <= value <= MAX_TOKEN_ID:
            raise GrammarConfigError(f"token ids: {name}={value} is not a token id")
        if coord_start <= value < coord_start + num_coords:
            raise GrammarConfigError(f"token ids: {name}={value} lies among the coordinate tokens")
    seen: dict[int, str] = {}
    for name, value in [*structural.items(), ("none[0]", none[0])]:
        if value in seen:
            raise GrammarConfigError(f"token ids: {name} and {seen[value]} are the same id {value}")
        seen[value] = name
