/* The output grammar of Rex-Omni as a per-sequence state machine: the C core.
 *
 * runtime/decode/grammar.py documents the grammar, the recovery rules and the API;
 * ReferenceGrammarCore there is the plain-Python reference this file must match
 * exactly (same states, same transitions, same events). The decode loop calls next()
 * and advance() once per generated token, so both avoid allocating: next() returns a
 * (kind, ids) tuple built once per state at construction, and advance() returns None
 * unless a geometry (or a "None" payload) completed.
 *
 * Token ids arrive as Python ints of any size; an id outside 0..2**31-1 is no token
 * and is handled like any other id the grammar did not allow.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { KIND_FREE, KIND_COORD, KIND_CHOICE, KIND_FORCED, KIND_DONE, NUM_KINDS };
enum { GEOM_BOX, GEOM_POINT, GEOM_POLYGON, GEOM_TEXT };
enum {
    S_START,          /* before the first group */
    S_PHRASE,         /* after <|object_ref_start|> */
    S_AFTER_PHRASE,   /* after <|object_ref_end|> */
    S_PAYLOAD_START,  /* after <|box_start|> */
    S_NONE,           /* inside the ids of "None" */
    S_GEOM,           /* inside a geometry, or right after a "," between two */
    S_AFTER_GEOM,     /* a box or point is complete */
    S_AFTER_GROUP,    /* after <|box_end|> */
    S_SEP_SPACE,      /* after the "," that follows <|box_end|> */
    S_SEP_OPEN,       /* after ", " */
    S_SKIP,           /* malformed: waiting for a new group or the end */
    S_TEXT,           /* keypoint answer: free text */
    S_DONE
};

#define MAX_NONE_IDS 16
#define POLYGON_MIN_COORDS 6
#define MAX_TOKEN_ID INT32_MAX

typedef struct {
    PyObject_HEAD
    int geometry;
    long long coord_start, coord_stop; /* coordinate ids are [coord_start, coord_stop) */
    long long endoftext, im_end, object_ref_start, object_ref_end, box_start, box_end, comma, space;
    long long none_ids[MAX_NONE_IDS];
    int none_len;
    Py_ssize_t max_phrase_ids, max_polygon_coords;

    int state;
    int none_matched;
    int32_t *phrase;     /* max_phrase_ids slots */
    Py_ssize_t phrase_len;
    int32_t *bins;       /* max_polygon_coords slots (>= 4, enough for a box) */
    Py_ssize_t bins_len;
    PyObject *phrase_ids; /* tuple built on the group's first event; NULL before */

    /* next() results, one per state, built at construction */
    PyObject *next_free, *next_phrase, *next_done, *next_open, *next_after_group, *next_after_geom, *next_coord,
        *next_coord_or_none, *next_coord_or_close, *next_close_phrase, *next_box_start, *next_sep_space,
        *next_sep_open;
    PyObject *next_none_rest[MAX_NONE_IDS + 1]; /* indexed by ids of "None" seen so far */
} GrammarCore;

static int coords_per_geometry(int geometry) { return geometry == GEOM_BOX ? 4 : 2; }

static int is_coord(const GrammarCore *g, long long token) {
    return token >= g->coord_start && token < g->coord_stop;
}

static int polygon_closable(const GrammarCore *g) {
    return g->geometry == GEOM_POLYGON && g->bins_len >= POLYGON_MIN_COORDS && g->bins_len % 2 == 0;
}

static void start_group_buffers(GrammarCore *g) {
    g->phrase_len = 0;
    g->bins_len = 0;
    g->none_matched = 0;
    Py_CLEAR(g->phrase_ids);
}

static void reset_state(GrammarCore *g) {
    g->state = g->geometry == GEOM_TEXT ? S_TEXT : S_START;
    start_group_buffers(g);
}

/* (kind, (ids...)) with a new reference; NULL on failure */
static PyObject *make_next(PyObject *kind, const long long *ids, Py_ssize_t n) {
    PyObject *tuple = PyTuple_New(n);
    if (tuple == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *id = PyLong_FromLongLong(ids[i]);
        if (id == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, i, id);
    }
    PyObject *pair = PyTuple_Pack(2, kind, tuple);
    Py_DECREF(tuple);
    return pair;
}

static int build_next_table(GrammarCore *g, PyObject *const *kinds) {
    long long open[2] = {g->object_ref_start, g->im_end};
    long long after_group[2] = {g->comma, g->im_end};
    long long close_geom[2] = {g->comma, g->box_end};
    long long sep_space[2] = {g->space, g->object_ref_start};
    long long none_rest[MAX_NONE_IDS + 1];

    g->next_free = make_next(kinds[KIND_FREE], NULL, 0);
    g->next_phrase = make_next(kinds[KIND_FREE], &g->object_ref_end, 1);
    g->next_done = make_next(kinds[KIND_DONE], NULL, 0);
    g->next_open = make_next(kinds[KIND_CHOICE], open, 2);
    g->next_after_group = make_next(kinds[KIND_CHOICE], after_group, 2);
    g->next_after_geom = make_next(kinds[KIND_CHOICE], close_geom, 2);
    g->next_coord = make_next(kinds[KIND_COORD], NULL, 0);
    g->next_coord_or_none = make_next(kinds[KIND_COORD], g->none_ids, 1);
    g->next_coord_or_close = make_next(kinds[KIND_COORD], close_geom, 2);
    g->next_close_phrase = make_next(kinds[KIND_FORCED], &g->object_ref_end, 1);
    g->next_box_start = make_next(kinds[KIND_FORCED], &g->box_start, 1);
    g->next_sep_space = make_next(kinds[KIND_FORCED], sep_space, 2);
    g->next_sep_open = make_next(kinds[KIND_FORCED], &g->object_ref_start, 1);
    if (!g->next_free || !g->next_phrase || !g->next_done || !g->next_open || !g->next_after_group || !g->next_after_geom ||
        !g->next_coord || !g->next_coord_or_none || !g->next_coord_or_close || !g->next_close_phrase ||
        !g->next_box_start || !g->next_sep_space || !g->next_sep_open)
        return -1;
    for (int matched = 0; matched <= g->none_len; matched++) {
        int n = 0;
        for (int i = matched; i < g->none_len; i++) none_rest[n++] = g->none_ids[i];
        none_rest[n++] = g->box_end;
        g->next_none_rest[matched] = make_next(kinds[KIND_FORCED], none_rest, n);
        if (g->next_none_rest[matched] == NULL) return -1;
    }
    return 0;
}

static int check_token_id(long long id, const char *name) {
    if (id < 0 || id > MAX_TOKEN_ID) {
        PyErr_Format(PyExc_ValueError, "token ids must be in 0..%d, got %s=%lld", MAX_TOKEN_ID, name, id);
        return -1;
    }
    return 0;
}

static int read_none_ids(GrammarCore *g, PyObject *none) {
    PyObject *seq = PySequence_Fast(none, "none must be a sequence of token ids");
    if (seq == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > MAX_NONE_IDS) {
        PyErr_Format(PyExc_ValueError, "\"None\" must be 1 to %d ids, got %zd", MAX_NONE_IDS, n);
        Py_DECREF(seq);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long id = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if ((id == -1 && PyErr_Occurred()) || check_token_id(id, "none") < 0) {
            Py_DECREF(seq);
            return -1;
        }
        g->none_ids[i] = id;
    }
    g->none_len = (int)n;
    Py_DECREF(seq);
    return 0;
}

static void core_dealloc(PyObject *op) {
    GrammarCore *g = (GrammarCore *)op;
    PyMem_Free(g->phrase);
    PyMem_Free(g->bins);
    Py_XDECREF(g->phrase_ids);
    Py_XDECREF(g->next_free);
    Py_XDECREF(g->next_phrase);
    Py_XDECREF(g->next_done);
    Py_XDECREF(g->next_open);
    Py_XDECREF(g->next_after_group);
    Py_XDECREF(g->next_after_geom);
    Py_XDECREF(g->next_coord);
    Py_XDECREF(g->next_coord_or_none);
    Py_XDECREF(g->next_coord_or_close);
    Py_XDECREF(g->next_close_phrase);
    Py_XDECREF(g->next_box_start);
    Py_XDECREF(g->next_sep_space);
    Py_XDECREF(g->next_sep_open);
    for (int i = 0; i <= MAX_NONE_IDS; i++) Py_XDECREF(g->next_none_rest[i]);
    Py_TYPE(op)->tp_free(op);
}

static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"geometry", "coord_start", "num_coords", "endoftext", "im_end",
                               "object_ref_start", "object_ref_end", "box_start", "box_end", "comma",
                               "space", "none", "max_phrase_ids", "max_polygon_coords", "kinds", NULL};
    int geometry;
    long long coord_start, num_coords, endoftext, im_end, object_ref_start, object_ref_end, box_start, box_end,
        comma, space;
    PyObject *none, *kinds;
    Py_ssize_t max_phrase_ids, max_polygon_coords;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iLLLLLLLLLLOnnO", keywords, &geometry, &coord_start,
                                     &num_coords, &endoftext, &im_end, &object_ref_start, &object_ref_end,
                                     &box_start, &box_end, &comma, &space, &none, &max_phrase_ids,
                                     &max_polygon_coords, &kinds))
        return NULL;
    if (geometry < GEOM_BOX || geometry > GEOM_TEXT) {
        PyErr_Format(PyExc_ValueError, "geometry must be one of 0..%d, got %d", GEOM_TEXT, geometry);
        return NULL;
    }
    if (num_coords < 1 || coord_start < 0 || coord_start > MAX_TOKEN_ID - num_coords) {
        PyErr_Format(PyExc_ValueError, "coordinate ids %lld + %lld do not fit in 0..%d", coord_start, num_coords,
                     MAX_TOKEN_ID);
        return NULL;
    }
    if (check_token_id(endoftext, "endoftext") < 0 || check_token_id(im_end, "im_end") < 0 ||
        check_token_id(object_ref_start, "object_ref_start") < 0 ||
        check_token_id(object_ref_end, "object_ref_end") < 0 || check_token_id(box_start, "box_start") < 0 ||
        check_token_id(box_end, "box_end") < 0 || check_token_id(comma, "comma") < 0 ||
        check_token_id(space, "space") < 0)
        return NULL;
    if (max_phrase_ids < 1) {
        PyErr_Format(PyExc_ValueError, "max_phrase_ids must be >= 1, got %zd", max_phrase_ids);
        return NULL;
    }
    if (max_polygon_coords < POLYGON_MIN_COORDS || max_polygon_coords % 2) {
        PyErr_Format(PyExc_ValueError, "max_polygon_coords must be even and >= %d, got %zd", POLYGON_MIN_COORDS,
                     max_polygon_coords);
        return NULL;
    }
    PyObject *kind_seq = PySequence_Fast(kinds, "kinds must be a sequence");
    if (kind_seq == NULL) return NULL;
    if (PySequence_Fast_GET_SIZE(kind_seq) != NUM_KINDS) {
        PyErr_Format(PyExc_ValueError, "kinds must hold %d objects, got %zd", NUM_KINDS,
                     PySequence_Fast_GET_SIZE(kind_seq));
        Py_DECREF(kind_seq);
        return NULL;
    }

    GrammarCore *g = (GrammarCore *)type->tp_alloc(type, 0); /* zero-filled: every pointer NULL */
    if (g == NULL) {
        Py_DECREF(kind_seq);
        return NULL;
    }
    g->geometry = geometry;
    g->coord_start = coord_start;
    g->coord_stop = coord_start + num_coords;
    g->endoftext = endoftext;
    g->im_end = im_end;
    g->object_ref_start = object_ref_start;
    g->object_ref_end = object_ref_end;
    g->box_start = box_start;
    g->box_end = box_end;
    g->comma = comma;
    g->space = space;
    g->max_phrase_ids = max_phrase_ids;
    g->max_polygon_coords = max_polygon_coords;
    g->phrase = PyMem_New(int32_t, (size_t)max_phrase_ids);
    g->bins = PyMem_New(int32_t, (size_t)max_polygon_coords);
    if (g->phrase == NULL || g->bins == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    if (read_none_ids(g, none) < 0 || build_next_table(g, PySequence_Fast_ITEMS(kind_seq)) < 0) goto fail;
    Py_DECREF(kind_seq);
    reset_state(g);
    return (PyObject *)g;

fail:
    Py_DECREF(kind_seq);
    Py_DECREF(g);
    return NULL;
}

static PyObject *core_next(PyObject *op, PyObject *unused) {
    GrammarCore *g = (GrammarCore *)op;
    PyObject *result;
    (void)unused;
    switch (g->state) {
    case S_START:
    case S_SKIP: result = g->next_open; break;
    case S_PHRASE: result = g->phrase_len >= g->max_phrase_ids ? g->next_close_phrase : g->next_phrase; break;
    case S_TEXT: result = g->next_free; break;
    case S_AFTER_PHRASE: result = g->next_box_start; break;
    case S_PAYLOAD_START: result = g->next_coord_or_none; break;
    case S_NONE: result = g->next_none_rest[g->none_matched]; break;
    case S_GEOM:
        if (polygon_closable(g))
            result = g->bins_len < g->max_polygon_coords ? g->next_coord_or_close : g->next_after_geom;
        else
            result = g->next_coord;
        break;
    case S_AFTER_GEOM: result = g->next_after_geom; break;
    case S_AFTER_GROUP: result = g->next_after_group; break;
    case S_SEP_SPACE: result = g->next_sep_space; break;
    case S_SEP_OPEN: result = g->next_sep_open; break;
    default: result = g->next_done; break;
    }
    Py_INCREF(result);
    return result;
}

/* (phrase ids, bins) of the current geometry; the phrase tuple is shared by the group's events */
static PyObject *make_event(GrammarCore *g) {
    if (g->phrase_ids == NULL) {
        g->phrase_ids = PyTuple_New(g->phrase_len);
        if (g->phrase_ids == NULL) return NULL;
        for (Py_ssize_t i = 0; i < g->phrase_len; i++) {
            PyObject *id = PyLong_FromLong(g->phrase[i]);
            if (id == NULL) {
                Py_CLEAR(g->phrase_ids);
                return NULL;
            }
            PyTuple_SET_ITEM(g->phrase_ids, i, id);
        }
    }
    PyObject *bins = PyTuple_New(g->bins_len);
    if (bins == NULL) return NULL;
    for (Py_ssize_t i = 0; i < g->bins_len; i++) {
        PyObject *value = PyLong_FromLong(g->bins[i]);
        if (value == NULL) {
            Py_DECREF(bins);
            return NULL;
        }
        PyTuple_SET_ITEM(bins, i, value);
    }
    PyObject *event = PyTuple_Pack(2, g->phrase_ids, bins);
    Py_DECREF(bins);
    return event;
}

static PyObject *advance_none(GrammarCore *g, long long token) {
    if (g->none_matched < g->none_len) {
        if (token == g->none_ids[g->none_matched])
            g->none_matched++;
        else
            g->state = S_SKIP;
        Py_RETURN_NONE;
    }
    if (token == g->box_end) {
        g->state = S_AFTER_GROUP;
        return make_event(g);
    }
    g->state = S_SKIP;
    Py_RETURN_NONE;
}

static PyObject *advance_geometry(GrammarCore *g, long long token) {
    if (is_coord(g, token)) {
        if (g->geometry == GEOM_POLYGON) {
            if (g->bins_len < g->max_polygon_coords)
                g->bins[g->bins_len++] = (int32_t)(token - g->coord_start);
            else
                g->state = S_SKIP;
            Py_RETURN_NONE;
        }
        g->bins[g->bins_len++] = (int32_t)(token - g->coord_start);
        if (g->bins_len == coords_per_geometry(g->geometry)) {
            g->state = S_AFTER_GEOM;
            return make_event(g);
        }
        Py_RETURN_NONE;
    }
    if (polygon_closable(g) && (token == g->comma || token == g->box_end)) {
        PyObject *event = make_event(g);
        g->bins_len = 0;
        if (token == g->box_end) g->state = S_AFTER_GROUP;
        return event;
    }
    g->state = S_SKIP;
    Py_RETURN_NONE;
}

static PyObject *core_advance(PyObject *op, PyObject *arg) {
    GrammarCore *g = (GrammarCore *)op;
    int overflow = 0;
    long long token = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (token == -1 && PyErr_Occurred()) return NULL;
    if (overflow) token = -1; /* beyond 64 bits: no token, like any negative id */

    int state = g->state;
    if (state == S_DONE) Py_RETURN_NONE;
    if (token == g->endoftext || token == g->im_end) {
        g->state = S_DONE;
        Py_RETURN_NONE;
    }
    if (state == S_TEXT) Py_RETURN_NONE;
    if (token == g->object_ref_start) {
        g->state = S_PHRASE;
        start_group_buffers(g);
        Py_RETURN_NONE;
    }

    switch (state) {
    case S_PHRASE:
        if (token == g->object_ref_end)
            g->state = S_AFTER_PHRASE;
        else if (token < 0 || token > MAX_TOKEN_ID)
            g->state = S_SKIP;
        else if (g->phrase_len < g->max_phrase_ids)
            g->phrase[g->phrase_len++] = (int32_t)token;
        Py_RETURN_NONE;
    case S_AFTER_PHRASE:
        g->state = token == g->box_start ? S_PAYLOAD_START : S_SKIP;
        Py_RETURN_NONE;
    case S_PAYLOAD_START:
        if (token == g->none_ids[0]) {
            g->state = S_NONE;
            g->none_matched = 1;
            Py_RETURN_NONE;
        }
        if (is_coord(g, token)) {
            g->state = S_GEOM;
            return advance_geometry(g, token);
        }
        g->state = S_SKIP;
        Py_RETURN_NONE;
    case S_NONE: return advance_none(g, token);
    case S_GEOM: return advance_geometry(g, token);
    case S_AFTER_GEOM:
        if (token == g->comma) {
            g->state = S_GEOM;
            g->bins_len = 0;
        } else {
            g->state = token == g->box_end ? S_AFTER_GROUP : S_SKIP;
        }
        Py_RETURN_NONE;
    case S_AFTER_GROUP:
        g->state = token == g->comma ? S_SEP_SPACE : S_SKIP;
        Py_RETURN_NONE;
    case S_SEP_SPACE:
        g->state = token == g->space ? S_SEP_OPEN : S_SKIP;
        Py_RETURN_NONE;
    default: /* S_START, S_SEP_OPEN, S_SKIP: only a new group or the end, handled above */
        g->state = S_SKIP;
        Py_RETURN_NONE;
    }
}

/* (start, stop) coordinate ids the next coordinate may take for a well-ordered box (grammar.py's docstring) */
static PyObject *core_coord_range(PyObject *op, PyObject *unused) {
    GrammarCore *g = (GrammarCore *)op;
    long long start = g->coord_start, stop = g->coord_stop;
    (void)unused;
    if (g->geometry == GEOM_BOX && (g->state == S_PAYLOAD_START || g->state == S_GEOM)) {
        Py_ssize_t slot = g->state == S_GEOM ? g->bins_len : 0;
        if (slot < 2) {
            stop -= 1;
        } else {
            long long low = start + g->bins[slot - 2] + 1;
            start = low < stop - 1 ? low : stop - 1;
        }
    }
    return Py_BuildValue("(LL)", start, stop);
}

static PyObject *core_reset(PyObject *op, PyObject *unused) {
    (void)unused;
    reset_state((GrammarCore *)op);
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"next", core_next, METH_NOARGS, "(kind, ids): what may come next; one cached tuple per state."},
    {"advance", core_advance, METH_O, "Consume one token id; None, or (phrase ids, bins) of what it completed."},
    {"coord_range", core_coord_range, METH_NOARGS, "(start, stop): the ids the next coordinate may take, boxes well-ordered."},
    {"reset", core_reset, METH_NOARGS, "Back to the start of a response."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GrammarCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rexedge.runtime.decode._grammar.GrammarCore",
    .tp_doc = PyDoc_STR("The output grammar state machine (see rexedge.runtime.decode.grammar)."),
    .tp_basicsize = sizeof(GrammarCore),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = core_new,
    .tp_dealloc = core_dealloc,
    .tp_methods = core_methods,
};

static struct PyModuleDef grammar_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_grammar",
    .m_doc = "C core of the Rex-Omni output grammar (see rexedge.runtime.decode.grammar).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__grammar(void) {
    if (PyType_Ready(&GrammarCoreType) < 0) return NULL;
    PyObject *module = PyModule_Create(&grammar_module);
    if (module == NULL) return NULL;
    Py_INCREF(&GrammarCoreType);
    if (PyModule_AddObject(module, "GrammarCore", (PyObject *)&GrammarCoreType) < 0) {
        Py_DECREF(&GrammarCoreType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
