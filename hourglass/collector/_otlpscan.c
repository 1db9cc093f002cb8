/*
 * collector._otlpscan — the per-span hot path of OTLP decoding, in C.
 *
 * scan(data) walks the protobuf wire format of an ExportTraceServiceRequest / TracesData once,
 * with the GIL released, and returns flat int64 tables of offsets into ``data`` and the few
 * numbers the span columns need (see SPAN_FIELDS etc. below and hourglass/collector/native_decode.py, which
 * turns them into the Arrow columns). It validates everything it reads: every length stays inside
 * its message, every string it records is UTF-8, ids have their OTLP sizes.
 *
 * It handles only the shape real exporters send. Anything else — a malformed message, an
 * unknown field, a field repeated where it is singular, a wrong id length, an all-zero id, a
 * time beyond int64, invalid UTF-8 — makes scan() return a
 * short reason string instead of the tables, and the caller decodes the request with the
 * pure-Python decoder, which gives the exact errors and rejections the OTLP receivers report.
 *
 * gather(data, starts, lengths) copies many slices of ``data`` into one buffer and returns
 * (int32 Arrow offsets, bytes): the data of an Arrow string/binary column, made without Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* record widths (int64 each); keep in sync with hourglass/collector/native_decode.py */
enum {
    SP_OFF, SP_LEN, SP_TRACE_ID, SP_SPAN_ID, SP_PARENT, SP_NAME_OFF, SP_NAME_LEN, SP_KIND,
    SP_START, SP_END, SP_STATUS_CODE, SP_STATUS_MSG_OFF, SP_STATUS_MSG_LEN, SP_SCOPE,
    SP_WIDTH
};
enum { AT_SPAN, AT_KEY, AT_VTYPE, AT_VOFF, AT_VLEN, AT_VINT, AT_KV_OFF, AT_KV_LEN, AT_WIDTH };
enum { EV_SPAN, EV_TIME, EV_NAME_OFF, EV_NAME_LEN, EV_OFF, EV_LEN, EV_WIDTH };
enum { LK_SPAN, LK_OFF, LK_LEN, LK_WIDTH };
enum { SC_OFF, SC_LEN, SC_RESOURCE, SC_WIDTH };
enum { RS_OFF, RS_LEN, RS_WIDTH };
enum { KY_OFF, KY_LEN, KY_WIDTH };

typedef struct {
    int64_t *v;
    Py_ssize_t n;   /* records */
    Py_ssize_t cap; /* records */
    int width;
} table_t;

/* why the fast path gave up; the Python decoder then handles the request */
typedef enum {
    OK = 0,
    F_NOMEM,
    F_MALFORMED,
    F_UNKNOWN_FIELD,
    F_REPEATED_SINGULAR,
    F_ID,
    F_TIME,
    F_UTF8,
    F_TOO_BIG,
} status_t;

static const char *REASONS[] = {
    "ok",
    "out of memory",
    "malformed protobuf",
    "unknown field",
    "singular field repeated",
    "span or trace id of the wrong size, or all zero",
    "time beyond int64",
    "invalid UTF-8",
    "message too big",
};

typedef struct {
    uint64_t hash;
    int64_t off;
    int64_t len;
    int64_t id; /* -1: empty slot */
} key_slot_t;

typedef struct {
    const uint8_t *base;
    table_t spans, attrs, events, links, scopes, resources, keys;
    key_slot_t *slots;
    Py_ssize_t slot_cap; /* power of two */
} scan_t;

static int table_init(table_t *t, int width, Py_ssize_t cap) {
    t->width = width;
    t->n = 0;
    t->cap = cap;
    t->v = (int64_t *)malloc((size_t)cap * (size_t)width * sizeof(int64_t));
    return t->v != NULL;
}

static int64_t *table_push(table_t *t) {
    if (t->n == t->cap) {
        Py_ssize_t cap = t->cap * 2;
        int64_t *v = (int64_t *)realloc(t->v, (size_t)cap * (size_t)t->width * sizeof(int64_t));
        if (v == NULL) return NULL;
        t->v = v;
        t->cap = cap;
    }
    int64_t *row = t->v + t->n * t->width;
    t->n++;
    return row;
}

/* ---------------------------------------------------------------------------------------- */
/* wire format */

static inline int read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out) {
    const uint8_t *p = *pp;
    uint64_t result = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (p >= end) return 0;
        uint8_t byte = *p++;
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            if (shift == 63 && byte > 1) return 0; /* more than 64 bits */
            *pp = p;
            *out = result;
            return 1;
        }
    }
    return 0;
}

static inline uint64_t load_le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* one field: its number, wire type and, for LEN fields, the payload bounds */
typedef struct {
    uint32_t number;
    int wire;
    uint64_t varint;        /* wire 0 */
    uint64_t fixed;         /* wire 1 and 5 */
    const uint8_t *payload; /* wire 2 */
    size_t len;             /* wire 2 */
} field_t;

static status_t next_field(const uint8_t **pp, const uint8_t *end, field_t *f) {
    uint64_t tag;
    const uint8_t *tag_start = *pp;
    if (!read_varint(pp, end, &tag)) return F_MALFORMED;
    /* upb rejects a tag longer than 5 bytes (padded with 0x80s) as corrupt: do the same */
    if (*pp - tag_start > 5) return F_MALFORMED;
    uint64_t number = tag >> 3;
    if (number == 0 || number > 536870911u) return F_MALFORMED;
    f->number = (uint32_t)number;
    f->wire = (int)(tag & 7);
    switch (f->wire) {
    case 0:
        if (!read_varint(pp, end, &f->varint)) return F_MALFORMED;
        return OK;
    case 1:
        if (end - *pp < 8) return F_MALFORMED;
        f->fixed = load_le64(*pp);
        *pp += 8;
        return OK;
    case 2: {
        uint64_t len;
        const uint8_t *len_start = *pp;
        if (!read_varint(pp, end, &len)) return F_MALFORMED;
        /* upb also rejects a length longer than 5 bytes */
        if (*pp - len_start > 5) return F_MALFORMED;
        if (len > (uint64_t)(end - *pp)) return F_MALFORMED;
        f->payload = *pp;
        f->len = (size_t)len;
        *pp += len;
        return OK;
    }
    case 5: {
        if (end - *pp < 4) return F_MALFORMED;
        uint32_t v;
        memcpy(&v, *pp, 4);
        f->fixed = v;
        *pp += 4;
        return OK;
    }
    default: /* groups (3, 4) and invalid wire types */
        return F_MALFORMED;
    }
}

/* strict UTF-8 (no overlongs, no surrogates, nothing above U+10FFFF), as protobuf requires */
static int valid_utf8(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        /* ASCII runs, 8 bytes at a time */
        while (i + 8 <= n) {
            uint64_t chunk;
            memcpy(&chunk, s + i, 8);
            if (chunk & 0x8080808080808080ULL) break;
            i += 8;
        }
        if (i >= n) break;
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) return 0;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (i + 2 >= n) return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80) return 0;
            if (c == 0xE0 && c1 < 0xA0) return 0; /* overlong */
            if (c == 0xED && c1 > 0x9F) return 0; /* surrogate */
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (i + 3 >= n) return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2], c3 = s[i + 3];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80 || (c3 & 0xC0) != 0x80) return 0;
            if (c == 0xF0 && c1 < 0x90) return 0; /* overlong */
            if (c == 0xF4 && c1 > 0x8F) return 0; /* above U+10FFFF */
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

#define OFFSET(s, ptr) ((int64_t)((ptr) - (s)->base))
#define TRY(expr)                  \
    do {                           \
        status_t _st = (expr);     \
        if (_st != OK) return _st; \
    } while (0)
#define SEEN(bit)                                       \
    do {                                                \
        if (seen & (1u << (bit))) return F_REPEATED_SINGULAR; \
        seen |= 1u << (bit);                            \
    } while (0)

/* ---------------------------------------------------------------------------------------- */
/* attribute keys, interned per request: exact bytes -> dense id */

static uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ULL ^ (uint64_t)n; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static int slots_grow(scan_t *s) {
    Py_ssize_t cap = s->slot_cap * 2;
    key_slot_t *slots = (key_slot_t *)malloc((size_t)cap * sizeof(key_slot_t));
    if (slots == NULL) return 0;
    for (Py_ssize_t i = 0; i < cap; i++) slots[i].id = -1;
    for (Py_ssize_t i = 0; i < s->slot_cap; i++) {
        if (s->slots[i].id < 0) continue;
        Py_ssize_t j = (Py_ssize_t)(s->slots[i].hash & (uint64_t)(cap - 1));
        while (slots[j].id >= 0) j = (j + 1) & (cap - 1);
        slots[j] = s->slots[i];
    }
    free(s->slots);
    s->slots = slots;
    s->slot_cap = cap;
    return 1;
}

static status_t intern_key(scan_t *s, const uint8_t *key, size_t len, int64_t *id) {
    uint64_t h = hash_bytes(key, len);
    Py_ssize_t mask = s->slot_cap - 1;
    Py_ssize_t j = (Py_ssize_t)(h & (uint64_t)mask);
    while (s->slots[j].id >= 0) {
        key_slot_t *slot = &s->slots[j];
        if (slot->hash == h && (size_t)slot->len == len && memcmp(s->base + slot->off, key, len) == 0) {
            *id = slot->id;
            return OK;
        }
        j = (j + 1) & mask;
    }
    int64_t *row = table_push(&s->keys);
    if (row == NULL) return F_NOMEM;
    row[KY_OFF] = OFFSET(s, key);
    row[KY_LEN] = (int64_t)len;
    key_slot_t *slot = &s->slots[j];
    slot->hash = h;
    slot->off = row[KY_OFF];
    slot->len = (int64_t)len;
    slot->id = s->keys.n - 1;
    *id = slot->id;
    if (s->keys.n * 2 > s->slot_cap && !slots_grow(s)) return F_NOMEM;
    return OK;
}

/* ---------------------------------------------------------------------------------------- */
/* messages */

/* AnyValue: at most one of its oneof fields; nested arrays/kvlists stay as bytes */
static status_t scan_any_value(scan_t *s, const uint8_t *p, const uint8_t *end, int64_t *row) {
    int fields = 0;
    row[AT_VTYPE] = 0;
    row[AT_VOFF] = 0;
    row[AT_VLEN] = 0;
    row[AT_VINT] = 0;
    while (p < end) {
        field_t f;
        TRY(next_field(&p, end, &f));
        if (++fields > 1) return F_REPEATED_SINGULAR;
        row[AT_VTYPE] = f.number;
        switch (f.number) {
        case 1: /* string_value */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            if (!valid_utf8(f.payload, f.len)) return F_UTF8;
            /* fallthrough */
        case 5: /* array_value */
        case 6: /* kvlist_value */
        case 7: /* bytes_value */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            row[AT_VOFF] = OFFSET(s, f.payload);
            row[AT_VLEN] = (int64_t)f.len;
            break;
        case 2: /* bool_value */
        case 3: /* int_value */
            if (f.wire != 0) return F_UNKNOWN_FIELD;
            row[AT_VINT] = (int64_t)f.varint;
            break;
        case 4: /* double_value */
            if (f.wire != 1) return F_UNKNOWN_FIELD;
            row[AT_VINT] = (int64_t)f.fixed;
            break;
        default:
            return F_UNKNOWN_FIELD;
        }
    }
    return OK;
}

static status_t scan_key_value(scan_t *s, const uint8_t *p, const uint8_t *end, int64_t span_row) {
    int64_t *row = table_push(&s->attrs);
    if (row == NULL) return F_NOMEM;
    row[AT_SPAN] = span_row;
    row[AT_KV_OFF] = OFFSET(s, p);
    row[AT_KV_LEN] = (int64_t)(end - p);
    row[AT_VTYPE] = 0;
    row[AT_VOFF] = 0;
    row[AT_VLEN] = 0;
    row[AT_VINT] = 0;
    const uint8_t *key = p;
    size_t key_len = 0;
    unsigned seen = 0;
    while (p < end) {
        field_t f;
        TRY(next_field(&p, end, &f));
        if (f.number == 1 && f.wire == 2) {
            SEEN(1);
            if (!valid_utf8(f.payload, f.len)) return F_UTF8;
            key = f.payload;
            key_len = f.len;
        } else if (f.number == 2 && f.wire == 2) {
            SEEN(2);
            /* ``row`` stays valid: nothing below pushes onto the attributes table */
            TRY(scan_any_value(s, f.payload, f.payload + f.len, row));
        } else {
            return F_UNKNOWN_FIELD;
        }
    }
    return intern_key(s, key, key_len, &row[AT_KEY]);
}

static status_t scan_event(scan_t *s, const uint8_t *p, const uint8_t *end, int64_t span_row) {
    int64_t *row = table_push(&s->events);
    if (row == NULL) return F_NOMEM;
    row[EV_SPAN] = span_row;
    row[EV_TIME] = 0;
    row[EV_NAME_OFF] = 0;
    row[EV_NAME_LEN] = 0;
    row[EV_OFF] = OFFSET(s, p);
    row[EV_LEN] = (int64_t)(end - p);
    unsigned seen = 0;
    while (p < end) {
        field_t f;
        TRY(next_field(&p, end, &f));
        switch (f.number) {
        case 1: /* time_unix_nano */
            if (f.wire != 1) return F_UNKNOWN_FIELD;
            SEEN(1);
            if (f.fixed > (uint64_t)INT64_MAX) return F_TIME;
            row[EV_TIME] = (int64_t)f.fixed;
            break;
        case 2: /* name */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            SEEN(2);
            if (!valid_utf8(f.payload, f.len)) return F_UTF8;
            row[EV_NAME_OFF] = OFFSET(s, f.payload);
            row[EV_NAME_LEN] = (int64_t)f.len;
            break;
        case 3: /* attributes: read only for hint events, by the Python side */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            break;
        case 4: /* dropped_attributes_count */
            if (f.wire != 0) return F_UNKNOWN_FIELD;
            break;
        default:
            return F_UNKNOWN_FIELD;
        }
    }
    return OK;
}

static status_t scan_status(scan_t *s, const uint8_t *p, const uint8_t *end, int64_t *row) {
    unsigned seen = 0;
    while (p < end) {
        field_t f;
        TRY(next_field(&p, end, &f));
        if (f.number == 2 && f.wire == 2) {
            SEEN(2);
            if (!valid_utf8(f.payload, f.len)) return F_UTF8;
            row[SP_STATUS_MSG_OFF] = OFFSET(s, f.payload);
            row[SP_STATUS_MSG_LEN] = (int64_t)f.len;
        } else if (f.number == 3 && f.wire == 0) {
            SEEN(3);
            /* a code the enum does not define is stored as unset, as the Python decoder does */
            /* code is an int32: protobuf keeps the low 32 bits of the varint */
            row[SP_STATUS_CODE] = (uint32_t)f.varint <= 2 ? (int64_t)(uint32_t)f.varint : 0;
        } else {
            return F_UNKNOWN_FIELD;
        }
    }
    return OK;
}

static int all_zero(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

static status_t scan_span(scan_t *s, const uint8_t *p, const uint8_t *end, int64_t scope_index) {
    int64_t span_row = s->spans.n;
    int64_t *row = table_push(&s->spans);
    if (row == NULL) return F_NOMEM;
    memset(row, 0, SP_WIDTH * sizeof(int64_t));
    row[SP_OFF] = OFFSET(s, p);
    row[SP_LEN] = (int64_t)(end - p);
    row[SP_PARENT] = -1;
    row[SP_SCOPE] = scope_index;
    size_t trace_len = 0, span_len = 0;
    unsigned seen = 0;
    while (p < end) {
        field_t f;
        TRY(next_field(&p, end, &f));
        /* re-read the row: nested tables (attributes, events) never move the spans table, but
           keep the pointer obviously valid */
        row = s->spans.v + span_row * SP_WIDTH;
        switch (f.number) {
        case 1: /* trace_id */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            SEEN(1);
            if (f.len != 16 || all_zero(f.payload, 16)) return F_ID;
            row[SP_TRACE_ID] = OFFSET(s, f.payload);
            trace_len = f.len;
            break;
        case 2: /* span_id */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            SEEN(2);
            if (f.len != 8 || all_zero(f.payload, 8)) return F_ID;
            row[SP_SPAN_ID] = OFFSET(s, f.payload);
            span_len = f.len;
            break;
        case 3: /* trace_state */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            SEEN(3);
            if (!valid_utf8(f.payload, f.len)) return F_UTF8;
            break;
        case 4: /* parent_span_id: empty or all zero is a root */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            SEEN(4);
            if (f.len != 0 && f.len != 8) return F_ID;
            row[SP_PARENT] = (f.len == 8 && !all_zero(f.payload, 8)) ? OFFSET(s, f.payload) : -1;
            break;
        case 5: /* name */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            SEEN(5);
            if (!valid_utf8(f.payload, f.len)) return F_UTF8;
            row[SP_NAME_OFF] = OFFSET(s, f.payload);
            row[SP_NAME_LEN] = (int64_t)f.len;
            break;
        case 6: /* kind */
            if (f.wire != 0) return F_UNKNOWN_FIELD;
            SEEN(6);
            /* a kind the enum does not define is stored as unspecified, as the Python decoder does */
            /* kind is an int32: protobuf keeps the low 32 bits of the varint */
            row[SP_KIND] = (uint32_t)f.varint <= 5 ? (int64_t)(uint32_t)f.varint : 0;
            break;
        case 7: /* start_time_unix_nano */
        case 8: /* end_time_unix_nano */
            if (f.wire != 1) return F_UNKNOWN_FIELD;
            SEEN(f.number);
            if (f.fixed > (uint64_t)INT64_MAX) return F_TIME;
            row[f.number == 7 ? SP_START : SP_END] = (int64_t)f.fixed;
            break;
        case 9: /* attributes */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            TRY(scan_key_value(s, f.payload, f.payload + f.len, span_row));
            break;
        case 10: /* dropped_attributes_count */
        case 12: /* dropped_events_count */
        case 14: /* dropped_links_count */
            if (f.wire != 0) return F_UNKNOWN_FIELD;
            SEEN(f.number);
            break;
        case 11: /* events */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            TRY(scan_event(s, f.payload, f.payload + f.len, span_row));
            break;
        case 13: { /* links: decoded by the Python side (rare) */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            int64_t *link = table_push(&s->links);
            if (link == NULL) return F_NOMEM;
            link[LK_SPAN] = span_row;
            link[LK_OFF] = OFFSET(s, f.payload);
            link[LK_LEN] = (int64_t)f.len;
            break;
        }
        case 15: /* status */
            if (f.wire != 2) return F_UNKNOWN_FIELD;
            SEEN(15);
            TRY(scan_status(s, f.payload, f.payload + f.len, row));
            break;
        case 16: /* flags */
            if (f.wire != 5) return F_UNKNOWN_FIELD;
            SEEN(16);
            break;
        default:
            return F_UNKNOWN_FIELD;
        }
    }
    if (trace_len != 16 || span_len != 8) return F_ID;
    return OK;
}

/* ResourceSpans and ScopeSpans share a shape: 1 = the resource/scope (kept as bytes for the
   Python side), 2 = the repeated children, 3 = schema_url */
typedef status_t (*child_scan_t)(scan_t *, const uint8_t *, const uint8_t *, int64_t);

static status_t scan_container(scan_t *s, const uint8_t *p, const uint8_t *end, table_t *table, int64_t *row_init,
                               child_scan_t child) {
    int64_t index = table->n;
    int64_t *row = table_push(table);
    if (row == NULL) return F_NOMEM;
    memcpy(row, row_init, (size_t)table->width * sizeof(int64_t));
    unsigned seen = 0;
    while (p < end) {
        field_t f;
        TRY(next_field(&p, end, &f));
        if (f.number == 1 && f.wire == 2) {
            SEEN(1);
            row = table->v + index * table->width; /* children never grow this table, but be safe */
            row[0] = OFFSET(s, f.payload);         /* SC_OFF / RS_OFF */
            row[1] = (int64_t)f.len;               /* SC_LEN / RS_LEN */
        } else if (f.number == 2 && f.wire == 2) {
            TRY(child(s, f.payload, f.payload + f.len, index));
        } else if (f.number == 3 && f.wire == 2) {
            SEEN(3);
            if (!valid_utf8(f.payload, f.len)) return F_UTF8;
        } else {
            return F_UNKNOWN_FIELD;
        }
    }
    return OK;
}

static status_t scan_scope_spans(scan_t *s, const uint8_t *p, const uint8_t *end, int64_t resource_index) {
    int64_t init[SC_WIDTH] = {-1, 0, resource_index};
    return scan_container(s, p, end, &s->scopes, init, scan_span);
}

static status_t scan_resource_spans(scan_t *s, const uint8_t *p, const uint8_t *end, int64_t unused) {
    int64_t init[RS_WIDTH] = {-1, 0};
    return scan_container(s, p, end, &s->resources, init, scan_scope_spans);
}

static status_t scan_request(scan_t *s, const uint8_t *p, const uint8_t *end) {
    while (p < end) {
        field_t f;
        TRY(next_field(&p, end, &f));
        if (f.number == 1 && f.wire == 2) {
            TRY(scan_resource_spans(s, f.payload, f.payload + f.len, 0));
        } else {
            return F_UNKNOWN_FIELD;
        }
    }
    return OK;
}

static void scan_free(scan_t *s) {
    free(s->spans.v);
    free(s->attrs.v);
    free(s->events.v);
    free(s->links.v);
    free(s->scopes.v);
    free(s->resources.v);
    free(s->keys.v);
    free(s->slots);
}

static PyObject *table_bytes(const table_t *t) {
    return PyBytes_FromStringAndSize((const char *)t->v, t->n * t->width * (Py_ssize_t)sizeof(int64_t));
}

PyDoc_STRVAR(scan_doc,
             "scan(data) -> tuple[bytes, ...] | str\n\n"
             "Scan a serialized ExportTraceServiceRequest/TracesData. Returns the native int64 tables\n"
             "(spans, attributes, keys, events, links, scopes, resources), or a reason string when the\n"
             "request needs the pure-Python decoder.");

static PyObject *otlpscan_scan(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) != 0) return NULL;
    if (view.len > (Py_ssize_t)INT32_MAX) {
        PyBuffer_Release(&view);
        return PyUnicode_FromString(REASONS[F_TOO_BIG]);
    }
    scan_t s;
    memset(&s, 0, sizeof(s));
    s.base = (const uint8_t *)view.buf;
    /* a 1000-span request is ~400 kB: size the first allocation from the length */
    Py_ssize_t guess = view.len / 256 + 16;
    int ok = table_init(&s.spans, SP_WIDTH, guess) && table_init(&s.attrs, AT_WIDTH, guess * 8) &&
             table_init(&s.events, EV_WIDTH, guess) && table_init(&s.links, LK_WIDTH, 16) &&
             table_init(&s.scopes, SC_WIDTH, 16) && table_init(&s.resources, RS_WIDTH, 16) &&
             table_init(&s.keys, KY_WIDTH, 64);
    s.slot_cap = 256;
    s.slots = ok ? (key_slot_t *)malloc((size_t)s.slot_cap * sizeof(key_slot_t)) : NULL;
    if (!ok || s.slots == NULL) {
        scan_free(&s);
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < s.slot_cap; i++) s.slots[i].id = -1;

    status_t status;
    Py_BEGIN_ALLOW_THREADS
    status = scan_request(&s, s.base, s.base + view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);

    PyObject *result;
    if (status == F_NOMEM) {
        result = PyErr_NoMemory();
    } else if (status != OK) {
        result = PyUnicode_FromString(REASONS[status]);
    } else {
        result = Py_BuildValue("(NNNNNNN)", table_bytes(&s.spans), table_bytes(&s.attrs), table_bytes(&s.keys),
                               table_bytes(&s.events), table_bytes(&s.links), table_bytes(&s.scopes),
                               table_bytes(&s.resources));
    }
    scan_free(&s);
    return result;
}

PyDoc_STRVAR(gather_doc,
             "gather(data, starts, lengths) -> (offsets, values)\n\n"
             "Concatenate data[starts[i]:starts[i]+lengths[i]] (starts and lengths: native int64 buffers)\n"
             "into one bytes object; offsets is the int32 Arrow offsets buffer (len(starts) + 1 entries).");

static PyObject *otlpscan_gather(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data, starts, lengths;
    if (!PyArg_ParseTuple(args, "y*y*y*", &data, &starts, &lengths)) return NULL;
    PyObject *offsets_obj = NULL, *values_obj = NULL, *result = NULL;
    if (starts.len != lengths.len || starts.len % (Py_ssize_t)sizeof(int64_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "starts and lengths must be int64 buffers of the same size");
        goto done;
    }
    Py_ssize_t n = starts.len / (Py_ssize_t)sizeof(int64_t);
    /* any bytes-like object is accepted: read the int64s with memcpy (no alignment assumed) */
    const char *st = (const char *)starts.buf;
    const char *ln = (const char *)lengths.buf;
    int64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s0, l0;
        memcpy(&s0, st + i * 8, 8);
        memcpy(&l0, ln + i * 8, 8);
        if (l0 < 0 || s0 < 0 || s0 > data.len || l0 > data.len - s0) {
            PyErr_Format(PyExc_ValueError, "slice %zd [%lld, +%lld) is outside the %zd-byte buffer", i,
                         (long long)s0, (long long)l0, data.len);
            goto done;
        }
        total += l0;
        if (total > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "gathered slices exceed 2 GiB (int32 Arrow offsets)");
            goto done;
        }
    }
    offsets_obj = PyBytes_FromStringAndSize(NULL, (n + 1) * (Py_ssize_t)sizeof(int32_t));
    values_obj = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (offsets_obj == NULL || values_obj == NULL) goto done;
    {
        int32_t *off = (int32_t *)PyBytes_AS_STRING(offsets_obj);
        char *out = PyBytes_AS_STRING(values_obj);
        const char *src = (const char *)data.buf;
        int changed = 0;
        Py_BEGIN_ALLOW_THREADS
        int64_t pos = 0;
        off[0] = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            /* without the GIL another thread may write to mutable starts/lengths buffers: check again */
            int64_t s0, l0;
            memcpy(&s0, st + i * 8, 8);
            memcpy(&l0, ln + i * 8, 8);
            if (l0 < 0 || s0 < 0 || s0 > data.len || l0 > data.len - s0 || l0 > total - pos) {
                changed = 1;
                break;
            }
            memcpy(out + pos, src + s0, (size_t)l0);
            pos += l0;
            off[i + 1] = (int32_t)pos;
        }
        if (!changed && pos != total) changed = 1;
        Py_END_ALLOW_THREADS
        if (changed) {
            PyErr_SetString(PyExc_ValueError, "starts or lengths changed during gather");
            goto done;
        }
    }
    result = PyTuple_Pack(2, offsets_obj, values_obj);
done:
    Py_XDECREF(offsets_obj);
    Py_XDECREF(values_obj);
    PyBuffer_Release(&data);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&lengths);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", otlpscan_scan, METH_O, scan_doc},
    {"gather", otlpscan_gather, METH_VARARGS, gather_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "hourglass.collector._otlpscan", "OTLP protobuf scanner (the C hot path of hourglass.collector.native_decode).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__otlpscan(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "SPAN_WIDTH", SP_WIDTH) < 0 || PyModule_AddIntConstant(m, "ATTR_WIDTH", AT_WIDTH) < 0 ||
        PyModule_AddIntConstant(m, "EVENT_WIDTH", EV_WIDTH) < 0 || PyModule_AddIntConstant(m, "LINK_WIDTH", LK_WIDTH) < 0 ||
        PyModule_AddIntConstant(m, "SCOPE_WIDTH", SC_WIDTH) < 0 ||
        PyModule_AddIntConstant(m, "RESOURCE_WIDTH", RS_WIDTH) < 0 || PyModule_AddIntConstant(m, "KEY_WIDTH", KY_WIDTH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
