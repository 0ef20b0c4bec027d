/*
 * The lab guest: a multiboot kernel that dirties memory at a known rate and
 * checks that its memory still holds what it wrote.
 *
 * Command line (multiboot), all optional:
 *   ws=<MiB>       working set written at the rate (default 64)
 *   rate=<MiB/s>   target write rate, up to three decimals (default 0)
 *   mode=paced|cpu paced: touch rate/100 per 10 ms tick, one word per page;
 *                  cpu: rewrite whole pages `work` times each, as far as the
 *                  vCPU allows, so vCPU throttling slows it (default paced)
 *   pattern=seq|random|hotcold|bursty
 *                  which pages: seq walks the set in address order; random
 *                  picks uniformly; hotcold sends hot_pct % of the writes to
 *                  the first hot_ws_pct % of the set (each part uniformly);
 *                  bursty walks like seq, writing on_ms then idling off_ms
 *                  (default seq)
 *   hot_pct=<0..100>, hot_ws_pct=<1..100>   hotcold (defaults 90 and 10)
 *   on_ms=<ms>, off_ms=<ms>                 bursty, 10 ms to 1 h (1000, 1000)
 *   seed=<u32>     random and hotcold's generator (default: from the name)
 *   fill=<MiB>|max static data written once at boot (default 0)
 *   work=<passes>  passes over each page in cpu mode (default DEFAULT_WORK)
 *   verify=0|1     check fill and working set in the background (default 1)
 *   verify_budget_pct=<1..50>  the checker's share of the vCPU (default 5)
 *   corrupt_after_s=<s>  test only: zero one page once, that many seconds
 *                  after ready, behind the record's back
 *   name=<text>    echoed in the ready line
 *
 * Serial (COM1) lines, documented and parsed in lab/guest.py:
 *   hmguest event=boot ...
 *   hmguest event=ready ...
 *   hmguest event=progress ...   (about once a second)
 *   hmguest event=verify ...     (after each full sweep of the checker)
 *   hmguest event=corrupt ...    (corrupt_after_s only)
 *   hmguest event=error reason=...
 *
 * Time comes from the TSC, calibrated against the CMOS RTC; the PIT gives a
 * 100 Hz tick that wakes the idle loop. Work is owed by elapsed TSC time, so
 * ticks lost while the vCPU was descheduled are made up, within a bound.
 *
 * Integrity: every page's content follows from what the guest wrote. Fill
 * pages hold page_word(pfn) in every word. A working-set page holds
 * page_word(pfn) but for its first word, which paced writes change: a walk
 * writes walk_word(pass) there, picked pages' words are recorded in rec[];
 * in cpu mode the whole page holds rec[i]. Writer and checker run in the
 * same tick handler with interrupts off on the one vCPU, so the checker
 * never sees a page between its write and its record: a mismatch is memory
 * the guest did not write (a lost, stale or corrupted page after a
 * migration). See "the checker" for what a sweep reads.
 */
#include <stddef.h>
#include <stdint.h>

#define PAGE_SIZE 4096u
#define PAGE_WORDS (PAGE_SIZE / 4u)
#define MIB (1024u * 1024u)
#define PAGES_PER_MIB 256u
#define DEFAULT_WS_MIB 64u
#define DEFAULT_WORK 3u
#define MAX_WORK 100000u
#define MAX_RATE_MILLI 2000000u /* 2000 MiB/s */
#define TICK_HZ 100u
#define PIT_HZ 1193182u
#define PACED_CAP_TICKS 100u /* paced owes at most 1 s of pages */
#define CPU_CAP_TICKS 10u    /* cpu mode owes at most 100 ms of pages */
#define COM1 0x3f8
#define CMDLINE_MAX 512
#define NAME_MAX 48
#define DEFAULT_HOT_PCT 90u
#define DEFAULT_HOT_WS_PCT 10u
#define DEFAULT_PHASE_MS 1000u
#define MIN_PHASE_MS 10u
#define MAX_PHASE_MS 3600000u
#define MAX_CORRUPT_S 86400u
/* The checker: at most one sweep a second, within a share of the vCPU's time. */
#define DEFAULT_VERIFY_BUDGET_PCT 5u
#define MAX_VERIFY_BUDGET_PCT 50u
#define BLOCK_PAGES 16u
#define BAD_LIST_MAX 8u
#define WORD_STEP 389u /* odd: a sweep's sample word visits every offset in 1024 sweeps */

#define MB_BOOT_MAGIC 0x2BADB002u
#define MB_INFO_CMDLINE (1u << 2)
#define MB_INFO_MMAP (1u << 6)

struct mb_info {
	uint32_t flags;
	uint32_t mem_lower;
	uint32_t mem_upper;
	uint32_t boot_device;
	uint32_t cmdline;
	uint32_t mods_count;
	uint32_t mods_addr;
	uint32_t syms[4];
	uint32_t mmap_length;
	uint32_t mmap_addr;
};

struct mb_mmap_entry {
	uint32_t size;
	uint64_t addr;
	uint64_t len;
	uint32_t type;
} __attribute__((packed));

struct idt_entry {
	uint16_t offset_low;
	uint16_t selector;
	uint8_t zero;
	uint8_t type_attr;
	uint16_t offset_high;
} __attribute__((packed));

struct idt_desc {
	uint16_t limit;
	uint32_t base;
} __attribute__((packed));

enum mode { MODE_PACED, MODE_CPU };
enum pattern { PATTERN_SEQ, PATTERN_RANDOM, PATTERN_HOTCOLD, PATTERN_BURSTY };

extern char _kernel_end[];
extern void irq_timer(void);
extern void irq_other(void);
extern const uint32_t exc_table[32];

void kmain(uint32_t magic, const struct mb_info *mbi);
void tick(void);
void fault(uint32_t vector);

static struct idt_entry idt[256];

/* Parameters. */
static uint32_t ws_mib = DEFAULT_WS_MIB;
static uint32_t rate_milli; /* MiB/s x 1000 */
static enum mode mode = MODE_PACED;
static enum pattern pattern = PATTERN_SEQ;
static uint32_t hot_pct = DEFAULT_HOT_PCT;
static uint32_t hot_ws_pct = DEFAULT_HOT_WS_PCT;
static uint32_t on_ms = DEFAULT_PHASE_MS;
static uint32_t off_ms = DEFAULT_PHASE_MS;
static uint32_t seed;
static int seed_given;
static uint32_t verify_wanted = 1;
static uint32_t verify_budget_pct = DEFAULT_VERIFY_BUDGET_PCT;
static uint32_t corrupt_after_s; /* 0: never */
static uint32_t fill_mib;
static int fill_max;
static uint32_t work = DEFAULT_WORK;
static uint32_t tsc_khz_given; /* tsc_khz= from the host: no calibration needed */
static char name[NAME_MAX + 1];
static char cmdline[CMDLINE_MAX + 1];

/* Memory layout. */
static uint32_t mem_mib;
static uintptr_t region_base;
static uintptr_t region_end;
static uintptr_t fill_base;
static uintptr_t ws_base;
static uint32_t fill_pages;
static uint32_t ws_pages;
static uint32_t hot_pages;   /* hotcold: pages 0..hot_pages-1 of the set */
static uint32_t total_pages; /* fill then working set: what the checker reads */
static uint32_t ws_cursor;

/* Bookkeeping, outside fill and working set (below them, or at their start). */
static uintptr_t meta_base;
static uint32_t meta_bytes;
static uint32_t *rec;        /* cpu, random, hotcold: per ws page, the word last written */
static uint32_t *block_sum;  /* per 16 checked pages: the sum of their page_words */
static uint32_t *dirty_map;  /* random, hotcold: ws pages written this report window */
static uint8_t *bad_map;     /* per checked page: found mismatched once */

/* Time and accounting. */
static uint64_t tsc_hz;
static uint64_t ready_tsc;
static uint64_t last_tick_tsc;
static uint64_t credit;       /* pages owed x denom */
static uint64_t credit_per_s; /* pages per second x 1000 */
static uint64_t denom;        /* tsc_hz x 1000: one page of credit */
static uint64_t credit_cap;
static uint64_t cycle_tsc;    /* bursty: on plus off */
static uint64_t on_tsc;
static uint64_t dirtied_pages;
static uint64_t busy_tsc;
static uint64_t verify_busy_tsc;
static uint64_t report_tsc;
static uint64_t report_pages;
static uint64_t report_busy;
static uint64_t report_verify_busy;
static uint32_t window_distinct; /* random, hotcold: distinct pages this window */
static uint32_t mix = 0x9e3779b9u; /* cpu mode's chain */
static uint32_t stamp = 1;         /* paced picks: odd, new for every batch of writes */
static uint32_t walk_pass = 1;     /* paced walks: passes over the set begun */
static uint32_t rng;               /* the pick's generator (an LCG's high bits) */
static uint64_t corrupt_at_tsc;    /* 0: nothing to corrupt (any more) */

/* The checker. */
static uint32_t verify_on;
static uint32_t verify_cursor;     /* next block's first page, over fill then ws */
static uint32_t verify_word;       /* this sweep's sample word */
static int64_t verify_tsc_credit;  /* time the checker may still spend (or owes) */
static uint32_t verify_share;      /* its share of time, x 2^16 */
static uint64_t verify_page_credit; /* pages x tsc_hz it may still check: 1 sweep/s */
static uint64_t last_verify_tsc;
static uint64_t sweep_start_tsc;
static uint64_t sweeps;
static uint64_t checked_pages;
static uint64_t mismatched_pages;
static uint64_t sweep_mismatched;
static uint32_t bad_list[BAD_LIST_MAX];
static uint32_t bad_count;

/* ---- port I/O and TSC ---- */

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* ---- serial output ---- */

static void serial_init(void)
{
	outb(COM1 + 1, 0x00); /* no interrupts */
	outb(COM1 + 3, 0x80); /* DLAB */
	outb(COM1 + 0, 0x01); /* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03); /* 8N1 */
	outb(COM1 + 2, 0xc7); /* FIFO on, cleared */
	outb(COM1 + 4, 0x03);
}

static void serial_putc(char c)
{
	while (!(inb(COM1 + 5) & 0x20))
		;
	outb(COM1, (uint8_t)c);
}

struct line {
	char buf[512];
	uint32_t len;
};

static void put_str(struct line *l, const char *s)
{
	while (*s && l->len < sizeof(l->buf) - 2)
		l->buf[l->len++] = *s++;
}

static void put_u64(struct line *l, uint64_t v)
{
	char tmp[24];
	int n = 0;
	if (v <= 0xffffffffu) { /* 32-bit digits: no libgcc division */
		uint32_t w = (uint32_t)v;
		do {
			tmp[n++] = (char)('0' + w % 10);
			w /= 10;
		} while (w);
		while (n && l->len < sizeof(l->buf) - 2)
			l->buf[l->len++] = tmp[--n];
		return;
	}
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n && l->len < sizeof(l->buf) - 2)
		l->buf[l->len++] = tmp[--n];
}

/* v / 10^decimals printed with that many decimals. */
static void put_fixed(struct line *l, uint64_t v, uint32_t decimals)
{
	uint64_t scale = 1;
	for (uint32_t i = 0; i < decimals; i++)
		scale *= 10;
	put_u64(l, v / scale);
	if (!decimals)
		return;
	put_str(l, ".");
	uint64_t frac = v % scale;
	for (uint64_t d = scale / 10; d; d /= 10) {
		char c[2] = {(char)('0' + (frac / d) % 10), 0};
		put_str(l, c);
	}
}

static void put_hex(struct line *l, uint32_t v)
{
	put_str(l, "0x");
	for (int shift = 28; shift >= 0; shift -= 4) {
		char c[2] = {"0123456789abcdef"[(v >> shift) & 0xf], 0};
		put_str(l, c);
	}
}

static void put_kv(struct line *l, const char *key)
{
	put_str(l, " ");
	put_str(l, key);
	put_str(l, "=");
}

static void line_start(struct line *l, const char *event)
{
	l->len = 0;
	put_str(l, "hmguest event=");
	put_str(l, event);
}

static void line_send(struct line *l)
{
	l->buf[l->len++] = '\n';
	for (uint32_t i = 0; i < l->len; i++)
		serial_putc(l->buf[i]);
}

static const char *mode_name(void)
{
	return mode == MODE_CPU ? "cpu" : "paced";
}

static const char *pattern_name(void)
{
	switch (pattern) {
	case PATTERN_RANDOM:
		return "random";
	case PATTERN_HOTCOLD:
		return "hotcold";
	case PATTERN_BURSTY:
		return "bursty";
	default:
		return "seq";
	}
}

/* seq and bursty walk the set in address order; random and hotcold pick pages. */
static int walks(void)
{
	return pattern == PATTERN_SEQ || pattern == PATTERN_BURSTY;
}

static void fail(const char *reason, const char *detail_key, uint64_t detail)
{
	struct line l;
	line_start(&l, "error");
	put_kv(&l, "reason");
	put_str(&l, reason);
	if (detail_key) {
		put_kv(&l, detail_key);
		put_u64(&l, detail);
	}
	line_send(&l);
	halt_forever();
}

void fault(uint32_t vector)
{
	fail("exception", "vector", vector);
}

/* ---- command line ---- */

static int parse_uint(const char *s, uint32_t len, uint32_t max, uint32_t *out)
{
	uint64_t v = 0;
	if (!len)
		return 0;
	for (uint32_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return 0;
		v = v * 10 + (uint32_t)(s[i] - '0');
		if (v > max)
			return 0;
	}
	*out = (uint32_t)v;
	return 1;
}

/* A decimal with up to three fraction digits, as thousandths. */
static int parse_milli(const char *s, uint32_t len, uint32_t max, uint32_t *out)
{
	uint32_t i = 0, whole = 0, frac = 0, digits = 0;
	while (i < len && s[i] != '.')
		i++;
	if (!parse_uint(s, i, max / 1000, &whole))
		return 0;
	if (i < len) {
		if (i + 1 == len || len - i - 1 > 3)
			return 0;
		if (!parse_uint(s + i + 1, len - i - 1, 999, &frac))
			return 0;
		digits = len - i - 1;
		while (digits++ < 3)
			frac *= 10;
	}
	if ((uint64_t)whole * 1000 + frac > max)
		return 0;
	*out = whole * 1000 + frac;
	return 1;
}

static int key_is(const char *tok, uint32_t klen, const char *key)
{
	uint32_t i = 0;
	for (; i < klen && key[i]; i++)
		if (tok[i] != key[i])
			return 0;
	return i == klen && !key[i];
}

static void parse_token(const char *tok, uint32_t len)
{
	uint32_t k = 0;
	while (k < len && tok[k] != '=')
		k++;
	if (k == len)
		return; /* the loader puts the kernel path first: not key=value */
	const char *val = tok + k + 1;
	uint32_t vlen = len - k - 1;
	int ok = 1;

	if (key_is(tok, k, "ws")) {
		ok = parse_uint(val, vlen, 4096, &ws_mib);
	} else if (key_is(tok, k, "rate")) {
		ok = parse_milli(val, vlen, MAX_RATE_MILLI, &rate_milli);
	} else if (key_is(tok, k, "mode")) {
		if (key_is(val, vlen, "paced"))
			mode = MODE_PACED;
		else if (key_is(val, vlen, "cpu"))
			mode = MODE_CPU;
		else
			ok = 0;
	} else if (key_is(tok, k, "pattern")) {
		if (key_is(val, vlen, "seq"))
			pattern = PATTERN_SEQ;
		else if (key_is(val, vlen, "random"))
			pattern = PATTERN_RANDOM;
		else if (key_is(val, vlen, "hotcold"))
			pattern = PATTERN_HOTCOLD;
		else if (key_is(val, vlen, "bursty"))
			pattern = PATTERN_BURSTY;
		else
			ok = 0;
	} else if (key_is(tok, k, "hot_pct")) {
		ok = parse_uint(val, vlen, 100, &hot_pct);
	} else if (key_is(tok, k, "hot_ws_pct")) {
		ok = parse_uint(val, vlen, 100, &hot_ws_pct) && hot_ws_pct > 0;
	} else if (key_is(tok, k, "on_ms")) {
		ok = parse_uint(val, vlen, MAX_PHASE_MS, &on_ms) && on_ms >= MIN_PHASE_MS;
	} else if (key_is(tok, k, "off_ms")) {
		ok = parse_uint(val, vlen, MAX_PHASE_MS, &off_ms) && off_ms >= MIN_PHASE_MS;
	} else if (key_is(tok, k, "seed")) {
		ok = parse_uint(val, vlen, 0xffffffffu, &seed);
		seed_given = 1;
	} else if (key_is(tok, k, "verify")) {
		ok = parse_uint(val, vlen, 1, &verify_wanted);
	} else if (key_is(tok, k, "verify_budget_pct")) {
		ok = parse_uint(val, vlen, MAX_VERIFY_BUDGET_PCT, &verify_budget_pct) &&
		     verify_budget_pct > 0;
	} else if (key_is(tok, k, "corrupt_after_s")) {
		ok = parse_uint(val, vlen, MAX_CORRUPT_S, &corrupt_after_s) && corrupt_after_s > 0;
	} else if (key_is(tok, k, "fill")) {
		if (key_is(val, vlen, "max"))
			fill_max = 1;
		else
			ok = parse_uint(val, vlen, 4096, &fill_mib);
	} else if (key_is(tok, k, "tsc_khz")) {
		ok = parse_uint(val, vlen, 100000000u, &tsc_khz_given) && tsc_khz_given >= 10000u;
	} else if (key_is(tok, k, "work")) {
		ok = parse_uint(val, vlen, MAX_WORK, &work) && work > 0;
	} else if (key_is(tok, k, "name")) {
		uint32_t i = 0;
		for (; i < vlen && i < NAME_MAX; i++) {
			char c = val[i];
			int safe = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
				   (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
			name[i] = safe ? c : '_';
		}
		name[i] = 0;
	}
	if (!ok) {
		struct line l;
		line_start(&l, "error");
		put_kv(&l, "reason");
		put_str(&l, "bad_parameter");
		put_kv(&l, "key");
		for (uint32_t i = 0; i < k && i < 16; i++) {
			char c[2] = {tok[i], 0};
			put_str(&l, c);
		}
		line_send(&l);
		halt_forever();
	}
}

static void parse_cmdline(const struct mb_info *mbi)
{
	if (!(mbi->flags & MB_INFO_CMDLINE) || !mbi->cmdline)
		return;
	const char *src = (const char *)(uintptr_t)mbi->cmdline;
	uint32_t n = 0;
	while (src[n] && n < CMDLINE_MAX) {
		cmdline[n] = src[n];
		n++;
	}
	cmdline[n] = 0;
	uint32_t i = 0;
	while (i < n) {
		while (i < n && cmdline[i] == ' ')
			i++;
		uint32_t start = i;
		while (i < n && cmdline[i] != ' ')
			i++;
		if (i > start)
			parse_token(cmdline + start, i - start);
	}
}

/* ---- memory ---- */

static uint64_t page_align(uint64_t v)
{
	return (v + PAGE_SIZE - 1) & ~(uint64_t)(PAGE_SIZE - 1);
}

/* Whether the working set's written words need a record (else they follow the walk). */
static int recorded(void)
{
	return mode == MODE_CPU || !walks();
}

/* The bookkeeping's size for a set of ws_pages and up to `checked` checked pages. */
static uint64_t meta_size(uint64_t checked)
{
	uint64_t size = page_align(checked / BLOCK_PAGES * 4) + page_align((checked + 7) / 8);
	if (recorded())
		size += page_align((uint64_t)ws_pages * 4);
	if (!walks())
		size += page_align(((uint64_t)ws_pages + 31) / 32 * 4);
	return size;
}

static void find_memory(const struct mb_info *mbi)
{
	if (!(mbi->flags & MB_INFO_MMAP))
		fail("no_memory_map", NULL, 0);
	uint64_t top = 0;
	uint64_t start = ((uintptr_t)_kernel_end + MIB - 1) & ~(uint64_t)(MIB - 1);
	uint64_t end = 0;
	uintptr_t p = mbi->mmap_addr;
	while (p < mbi->mmap_addr + mbi->mmap_length) {
		const struct mb_mmap_entry *e = (const struct mb_mmap_entry *)p;
		if (e->type == 1) {
			uint64_t a = e->addr, b = e->addr + e->len;
			if (b > top)
				top = b;
			if (a <= start && b > start)
				end = b;
		}
		p += e->size + 4;
	}
	if (end > 0xffff0000u)
		end = 0xffff0000u; /* no paging: stay in 32-bit physical space */
	end &= ~(uint64_t)(PAGE_SIZE - 1);
	mem_mib = (uint32_t)((top + MIB - 1) / MIB);
	if (end <= start)
		fail("no_memory", "avail_mib", 0);

	/*
	 * The bookkeeping goes between the kernel and 2 MiB if it fits (the
	 * loader's command line there was copied already), else at the start of
	 * the region. Sized for the largest fill, which fill=max may take.
	 */
	ws_pages = ws_mib * PAGES_PER_MIB;
	meta_bytes = (uint32_t)meta_size((end - start) / PAGE_SIZE);
	uint64_t gap = page_align((uintptr_t)_kernel_end);
	if (gap + meta_bytes <= start) {
		meta_base = (uintptr_t)gap;
	} else {
		meta_base = (uintptr_t)start;
		start += meta_bytes;
		if (start >= end)
			fail("no_memory", "avail_mib", 0);
	}
	region_base = (uintptr_t)start;
	region_end = (uintptr_t)end;

	uint64_t avail = end - start;
	uint64_t ws_bytes = (uint64_t)ws_mib * MIB;
	if (fill_max)
		fill_mib = ws_bytes < avail ? (uint32_t)((avail - ws_bytes) / MIB) : 0;
	uint64_t need = ws_bytes + (uint64_t)fill_mib * MIB;
	if (need > avail) {
		struct line l;
		line_start(&l, "error");
		put_kv(&l, "reason");
		put_str(&l, "no_memory");
		put_kv(&l, "need_mib");
		put_u64(&l, (need + MIB - 1) / MIB);
		put_kv(&l, "avail_mib");
		put_u64(&l, avail / MIB);
		line_send(&l);
		halt_forever();
	}
	if (rate_milli && !ws_mib)
		fail("empty_working_set", NULL, 0);
	fill_base = region_base;
	ws_base = region_base + fill_mib * MIB;
	fill_pages = fill_mib * PAGES_PER_MIB;
	total_pages = fill_pages + ws_pages;
	hot_pages = ws_pages * hot_ws_pct / 100;
	if (!hot_pages)
		hot_pages = 1;

	uintptr_t next = meta_base;
	block_sum = (uint32_t *)next;
	next += (uintptr_t)page_align(total_pages / BLOCK_PAGES * 4);
	bad_map = (uint8_t *)next;
	next += (uintptr_t)page_align((total_pages + 7) / 8);
	if (recorded()) {
		rec = (uint32_t *)next;
		next += (uintptr_t)page_align((uint64_t)ws_pages * 4);
	}
	if (!walks())
		dirty_map = (uint32_t *)next;
}

/* The word a page holds when nothing wrote it since boot: non-zero, one per page. */
static uint32_t page_word(uint32_t pfn)
{
	uint32_t h = pfn * 0x9e3779b9u + 0x2545f491u;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h | 1u;
}

static void zero(uintptr_t base, uint32_t bytes)
{
	uint32_t *dst = (uint32_t *)base;
	uint32_t words = bytes / 4;
	__asm__ volatile("rep stosl" : "+D"(dst), "+c"(words) : "a"(0) : "memory");
}

/* What a paced walk's pass p writes to the first word of each page: odd, new each pass. */
static uint32_t walk_word(uint32_t p)
{
	return (2u * p + 1u) * 0x9e3779b1u;
}

/*
 * Every page filled with its page_word (one string instruction per page:
 * where the guest's instructions are emulated, this lab's nested KVM, that
 * is hundreds of times cheaper than a loop), the sum of each 16 pages' words
 * noted. Working-set pages: a walk's first words hold walk_word(0); the
 * record of the others holds their page_word.
 */
static void write_pages(uintptr_t base, uint32_t pages, uint32_t first_block, int ws)
{
	uint32_t *dst = (uint32_t *)base;
	for (uint32_t i = 0; i < pages; i++) {
		uint32_t *page = dst;
		uint32_t words = PAGE_WORDS;
		uint32_t w = page_word((uint32_t)((uintptr_t)dst >> 12));
		if (i % BLOCK_PAGES == 0)
			block_sum[first_block + i / BLOCK_PAGES] = 0;
		block_sum[first_block + i / BLOCK_PAGES] += w;
		__asm__ volatile("rep stosl" : "+D"(dst), "+c"(words) : "a"(w) : "memory");
		if (ws && recorded())
			rec[i] = w;
		else if (ws)
			*(volatile uint32_t *)page = walk_word(0);
	}
}

/* ---- time ---- */

static uint8_t cmos_read(uint8_t reg)
{
	outb(0x70, (uint8_t)(0x80 | reg)); /* bit 7 keeps NMI off */
	return inb(0x71);
}

/* The RTC raises update-in-progress once a second: time one full second. */
static void calibrate_tsc(void)
{
	uint64_t t[2];
	for (int i = 0; i < 2; i++) {
		while (cmos_read(0x0a) & 0x80)
			;
		while (!(cmos_read(0x0a) & 0x80))
			;
		t[i] = rdtsc();
	}
	tsc_hz = t[1] - t[0];
	if (tsc_hz < 10000000u)
		fail("tsc_calibration", "tsc_hz", tsc_hz);
}

/* ---- interrupts ---- */

static void idt_set(uint32_t vector, uint32_t handler)
{
	idt[vector].offset_low = (uint16_t)(handler & 0xffff);
	idt[vector].selector = 0x08;
	idt[vector].zero = 0;
	idt[vector].type_attr = 0x8e; /* present, ring 0, 32-bit interrupt gate */
	idt[vector].offset_high = (uint16_t)(handler >> 16);
}

static void interrupts_init(void)
{
	for (uint32_t v = 0; v < 32; v++)
		idt_set(v, exc_table[v]);
	for (uint32_t v = 32; v < 256; v++)
		idt_set(v, (uint32_t)(uintptr_t)irq_other);
	idt_set(0x20, (uint32_t)(uintptr_t)irq_timer);
	struct idt_desc d = {sizeof(idt) - 1, (uint32_t)(uintptr_t)idt};
	__asm__ volatile("lidt %0" : : "m"(d));

	/* PICs: IRQ 0-7 at vectors 0x20-0x27, 8-15 at 0x28-0x2f; only IRQ0. */
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 0x20);
	outb(0xa1, 0x28);
	outb(0x21, 0x04);
	outb(0xa1, 0x02);
	outb(0x21, 0x01);
	outb(0xa1, 0x01);
	outb(0x21, 0xfe);
	outb(0xa1, 0xff);

	/* PIT channel 0, rate generator at TICK_HZ. */
	uint32_t divisor = (PIT_HZ + TICK_HZ / 2) / TICK_HZ;
	outb(0x43, 0x34);
	outb(0x40, (uint8_t)(divisor & 0xff));
	outb(0x40, (uint8_t)(divisor >> 8));
}

/* ---- dirtying ---- */

/* Uniform in 0..n-1 (n > 0): the high bits of an LCG, few instructions a page. */
static inline uint32_t below(uint32_t n)
{
	rng = rng * 1664525u + 1013904223u;
	return (uint32_t)(((uint64_t)rng * n) >> 32);
}

/* random and hotcold: the next page to write. */
static inline uint32_t pick_page(void)
{
	if (pattern == PATTERN_HOTCOLD) {
		if (hot_pages >= ws_pages || below(100) < hot_pct)
			return below(hot_pages);
		return hot_pages + below(ws_pages - hot_pages);
	}
	return below(ws_pages);
}

/* random and hotcold: marks the page written this window, counting it the first time. */
static inline void count_distinct(uint32_t i)
{
	__asm__ volatile("btsl %2, %1\n\tcmc\n\tadcl $0, %0"
			 : "+r"(window_distinct), "+m"(*dirty_map)
			 : "r"(i)
			 : "cc", "memory");
}

/*
 * paced, walking: one store per page dirties it; a pass writes the same
 * word everywhere, so nothing needs recording. Runs of contiguous pages are
 * written by an unrolled loop: few instructions per page matter where they
 * are emulated.
 */
static void dirty_paced_walk(uint32_t pages)
{
	uint32_t v = walk_word(walk_pass);
	while (pages) {
		uint32_t run = ws_pages - ws_cursor;
		if (run > pages)
			run = pages;
		volatile uint32_t *p = (uint32_t *)(ws_base + (uintptr_t)ws_cursor * PAGE_SIZE);
		uint32_t n = run;
		for (; n >= 4; n -= 4, p += 4 * PAGE_WORDS) {
			p[0] = v;
			p[PAGE_WORDS] = v;
			p[2 * PAGE_WORDS] = v;
			p[3 * PAGE_WORDS] = v;
		}
		for (; n; n--, p += PAGE_WORDS)
			p[0] = v;
		ws_cursor += run;
		if (ws_cursor == ws_pages) {
			ws_cursor = 0;
			v = walk_word(++walk_pass);
		}
		pages -= run;
		dirtied_pages += run;
	}
}

/* paced, random and hotcold: one store per picked page, and its record. */
static void dirty_paced_pick(uint32_t pages)
{
	uint32_t v = stamp;
	for (uint32_t k = 0; k < pages; k++) {
		uint32_t i = pick_page();
		*(volatile uint32_t *)(ws_base + (uintptr_t)i * PAGE_SIZE) = v;
		rec[i] = v;
		count_distinct(i);
	}
	stamp = v + 2;
	dirtied_pages += pages;
}

/*
 * cpu: rewrite the whole page `work` times; each pass stores a value
 * derived from what the previous pass left, so no pass can be skipped.
 * The values are odd: a page never goes back to zero.
 */
static void dirty_cpu(uint32_t pages)
{
	uint32_t v = mix;
	for (uint32_t k = 0; k < pages; k++) {
		uint32_t i;
		if (walks()) {
			i = ws_cursor;
			if (++ws_cursor == ws_pages)
				ws_cursor = 0;
		} else {
			i = pick_page();
			count_distinct(i);
		}
		uint32_t *page = (uint32_t *)(ws_base + (uintptr_t)i * PAGE_SIZE);
		for (uint32_t pass = 0; pass < work; pass++) {
			uint32_t *dst = page;
			uint32_t words = PAGE_WORDS;
			v = ((v ^ *(volatile uint32_t *)(page + (v & (PAGE_WORDS - 1)))) * 1664525u +
			     1u) |
			    1u;
			__asm__ volatile("rep stosl" : "+D"(dst), "+c"(words) : "a"(v) : "memory");
		}
		rec[i] = v;
		dirtied_pages++;
	}
	mix = v;
}

/* Writing time since ready at `tsc`: all of it, or bursty's on-phases only. */
static uint64_t writing_time(uint64_t tsc)
{
	uint64_t t = tsc - ready_tsc;
	if (pattern != PATTERN_BURSTY)
		return t;
	uint64_t into = t % cycle_tsc;
	return t / cycle_tsc * on_tsc + (into < on_tsc ? into : on_tsc);
}

/* ---- the checker ---- */

/*
 * Where instructions are emulated each one costs microseconds here, so the
 * checker reads one word per page and adds 16 pages' words in 16
 * instructions, compared with the sum they should have; only a block whose
 * sum differs is looked at page by page. A sweep reads the first word of
 * every working-set page written by paced mode (what its writes change; on
 * every fourth sweep its sample word too) and one sample word of every other
 * page, the sample moving on each sweep.
 */
#define ADD_WORD(k) "addl " #k "*4096(%1), %0\n\t"
static uint32_t sum_pages(uintptr_t word)
{
	uint32_t s;
	__asm__ volatile("movl (%1), %0\n\t" ADD_WORD(1) ADD_WORD(2) ADD_WORD(3) ADD_WORD(4)
				 ADD_WORD(5) ADD_WORD(6) ADD_WORD(7) ADD_WORD(8) ADD_WORD(9)
					 ADD_WORD(10) ADD_WORD(11) ADD_WORD(12) ADD_WORD(13)
						 ADD_WORD(14) ADD_WORD(15)
			 : "=&r"(s)
			 : "r"(word)
			 : "memory");
	return s;
}

#define ADD_REC(k) "addl " #k "*4(%1), %0\n\t"
static uint32_t sum_record(const uint32_t *r)
{
	uint32_t s;
	__asm__ volatile("movl (%1), %0\n\t" ADD_REC(1) ADD_REC(2) ADD_REC(3) ADD_REC(4) ADD_REC(5)
				 ADD_REC(6) ADD_REC(7) ADD_REC(8) ADD_REC(9) ADD_REC(10)
					 ADD_REC(11) ADD_REC(12) ADD_REC(13) ADD_REC(14)
						 ADD_REC(15)
			 : "=&r"(s)
			 : "r"(r)
			 : "memory");
	return s;
}

static uintptr_t page_addr(uint32_t i)
{
	return i < fill_pages ? fill_base + (uintptr_t)i * PAGE_SIZE
			      : ws_base + (uintptr_t)(i - fill_pages) * PAGE_SIZE;
}

/* The word `word` of page i (fill then working set) should hold. */
static uint32_t expected_word(uint32_t i, uint32_t word)
{
	if (i < fill_pages)
		return page_word((uint32_t)(page_addr(i) >> 12));
	uint32_t w = i - fill_pages;
	if (mode == MODE_CPU)
		return rec[w];
	if (word)
		return page_word((uint32_t)(page_addr(i) >> 12));
	if (!walks())
		return rec[w];
	return walk_word(w < ws_cursor ? walk_pass : walk_pass - 1);
}

/* The sum the word `word` of the block of 16 pages from page i should have. */
static uint32_t expected_sum(uint32_t i, uint32_t word)
{
	if (i < fill_pages || (mode != MODE_CPU && word))
		return block_sum[i / BLOCK_PAGES];
	uint32_t w = i - fill_pages;
	if (recorded())
		return sum_record(rec + w);
	uint32_t done = ws_cursor > w ? ws_cursor - w : 0;
	if (done > BLOCK_PAGES)
		done = BLOCK_PAGES;
	return done * walk_word(walk_pass) + (BLOCK_PAGES - done) * walk_word(walk_pass - 1);
}

static void note_mismatch(uint32_t i, uint32_t pfn)
{
	uint8_t bit = (uint8_t)(1u << (i & 7));
	sweep_mismatched++;
	if (bad_map[i >> 3] & bit)
		return; /* found in an earlier sweep */
	bad_map[i >> 3] |= bit;
	mismatched_pages++;
	if (bad_count < BAD_LIST_MAX)
		bad_list[bad_count++] = pfn;
}

static void check_words(uint32_t i, uint32_t word)
{
	uintptr_t base = page_addr(i) + word * 4;
	if (sum_pages(base) == expected_sum(i, word))
		return;
	for (uint32_t k = 0; k < BLOCK_PAGES; k++) {
		uintptr_t addr = base + (uintptr_t)k * PAGE_SIZE;
		if (*(const volatile uint32_t *)addr != expected_word(i + k, word))
			note_mismatch(i + k, (uint32_t)(addr >> 12));
	}
}

static void report_sweep(uint64_t now)
{
	struct line l;
	line_start(&l, "verify");
	put_kv(&l, "t");
	put_fixed(&l, (now - ready_tsc) * 100 / tsc_hz, 2);
	put_kv(&l, "sweeps");
	put_u64(&l, sweeps);
	put_kv(&l, "checked_pages");
	put_u64(&l, checked_pages);
	put_kv(&l, "pages");
	put_u64(&l, total_pages);
	put_kv(&l, "sweep_ms");
	put_u64(&l, (now - sweep_start_tsc) * 1000 / tsc_hz);
	put_kv(&l, "word");
	put_u64(&l, verify_word);
	put_kv(&l, "mismatched_pages");
	put_u64(&l, mismatched_pages);
	put_kv(&l, "sweep_mismatched");
	put_u64(&l, sweep_mismatched);
	if (bad_count) {
		put_kv(&l, "bad_pfns");
		for (uint32_t k = 0; k < bad_count; k++) {
			if (k)
				put_str(&l, ",");
			put_hex(&l, bad_list[k]);
		}
	}
	line_send(&l);
}

/* Checks the next block of 16 pages against what the guest wrote there. */
static void verify_block(void)
{
	uint32_t i = verify_cursor;
	if (i >= fill_pages && mode != MODE_CPU) {
		check_words(i, 0); /* what paced writes change */
		if ((sweeps & 3) == 3 && verify_word)
			check_words(i, verify_word);
	} else {
		check_words(i, verify_word);
	}
	checked_pages += BLOCK_PAGES;
	verify_cursor += BLOCK_PAGES;
	if (verify_cursor == total_pages) {
		uint64_t now = rdtsc();
		verify_cursor = 0;
		sweeps++;
		report_sweep(now);
		sweep_mismatched = 0;
		sweep_start_tsc = now;
		verify_word = (verify_word + WORD_STEP) % PAGE_WORDS;
	}
}

/*
 * Blocks while the checker has time and pages left: its share of the time
 * (what it overspends is owed), one sweep a second. Few 64-bit divisions:
 * each is a library call, costly where instructions are emulated.
 */
static void verify(uint64_t now)
{
	uint64_t dt = now - last_verify_tsc;
	if (dt > tsc_hz)
		dt = tsc_hz;
	last_verify_tsc = now;
	verify_tsc_credit += (int64_t)((dt * verify_share) >> 16);
	if (verify_tsc_credit > (int64_t)(tsc_hz >> 4))
		verify_tsc_credit = (int64_t)(tsc_hz >> 4); /* at most about 60 ms at once */
	verify_page_credit += dt * total_pages;
	if (verify_page_credit > (uint64_t)total_pages * tsc_hz)
		verify_page_credit = (uint64_t)total_pages * tsc_hz;
	uint64_t block = (uint64_t)BLOCK_PAGES * tsc_hz;
	uint64_t t = now;
	while (verify_tsc_credit > (int64_t)(t - now) && verify_page_credit >= block) {
		for (int k = 0; k < 8 && verify_page_credit >= block; k++) {
			verify_block();
			verify_page_credit -= block;
		}
		t = rdtsc();
	}
	verify_tsc_credit -= (int64_t)(t - now);
}

/* Test only: one page zeroed behind the record's back, as if a migration lost it
 * (the middle fill page, else the middle working-set page). */
static void corrupt_once(uint64_t now)
{
	uint32_t i = fill_pages ? fill_pages / 2 : fill_pages + ws_pages / 2;
	uintptr_t addr = page_addr(i);
	zero(addr, PAGE_SIZE);
	corrupt_at_tsc = 0;
	struct line l;
	line_start(&l, "corrupt");
	put_kv(&l, "t");
	put_fixed(&l, (now - ready_tsc) * 100 / tsc_hz, 2);
	put_kv(&l, "pfn");
	put_hex(&l, (uint32_t)(addr >> 12));
	line_send(&l);
}

/* ---- reports ---- */

static void put_mibps(struct line *l, uint64_t pages, uint64_t dt)
{
	put_fixed(l, pages * 1000 * tsc_hz / (dt * PAGES_PER_MIB), 3);
}

static void report(uint64_t now)
{
	uint64_t dt = now - report_tsc;
	uint64_t pages = dirtied_pages - report_pages;
	uint64_t busy = busy_tsc - report_busy;
	uint64_t vbusy = verify_busy_tsc - report_verify_busy;
	uint64_t on = writing_time(now) - writing_time(report_tsc);
	uint64_t distinct = pages < ws_pages ? pages : ws_pages;
	if (!walks())
		distinct = window_distinct;
	window_distinct = 0;
	if (!walks())
		zero((uintptr_t)dirty_map, (ws_pages + 31) / 32 * 4);
	report_tsc = now;
	report_pages = dirtied_pages;
	report_busy = busy_tsc;
	report_verify_busy = verify_busy_tsc;
	if (!dt)
		return;
	struct line l;
	line_start(&l, "progress");
	put_kv(&l, "t");
	put_fixed(&l, (now - ready_tsc) * 100 / tsc_hz, 2);
	put_kv(&l, "dirtied_pages");
	put_u64(&l, dirtied_pages);
	put_kv(&l, "dirtied_mib");
	put_fixed(&l, dirtied_pages * 10 / PAGES_PER_MIB, 1);
	put_kv(&l, "rate_mibps");
	put_mibps(&l, pages, dt);
	put_kv(&l, "busy_pct");
	put_fixed(&l, busy * 1000 / dt, 1);
	put_kv(&l, "ws_mib");
	put_u64(&l, ws_mib);
	put_kv(&l, "mode");
	put_str(&l, mode_name());
	put_kv(&l, "pattern");
	put_str(&l, pattern_name());
	put_kv(&l, "distinct_pages");
	put_u64(&l, distinct);
	put_kv(&l, "distinct_mibps");
	put_mibps(&l, distinct, dt);
	put_kv(&l, "cfg_rate_mibps");
	put_fixed(&l, rate_milli, 3);
	put_kv(&l, "on_pct");
	put_fixed(&l, (on > dt ? dt : on) * 1000 / dt, 1);
	put_kv(&l, "verify_pct");
	put_fixed(&l, vbusy * 1000 / dt, 1);
	line_send(&l);
}

void tick(void)
{
	uint64_t now = rdtsc();
	outb(0x20, 0x20); /* ack now: interrupts stay off until the idle loop */
	uint64_t dt = writing_time(now) - writing_time(last_tick_tsc);
	if (dt > tsc_hz)
		dt = tsc_hz; /* after a long pause; also keeps the product in range */
	credit += dt * credit_per_s;
	last_tick_tsc = now;
	if (credit > credit_cap)
		credit = credit_cap; /* a vCPU that fell further behind stays behind */
	uint64_t owed = credit / denom;
	if (owed) {
		credit -= owed * denom;
		if (mode == MODE_CPU)
			dirty_cpu((uint32_t)owed);
		else if (walks())
			dirty_paced_walk((uint32_t)owed);
		else
			dirty_paced_pick((uint32_t)owed);
	}
	if (now - report_tsc >= tsc_hz)
		report(now);
	uint64_t done = rdtsc();
	busy_tsc += done - now;
	if (corrupt_at_tsc && now >= corrupt_at_tsc)
		corrupt_once(now);
	if (verify_on) {
		verify(done);
		verify_busy_tsc += rdtsc() - done;
	}
}

/* ---- entry ---- */

static uint32_t name_hash(void)
{
	uint32_t h = 2166136261u; /* FNV-1a */
	for (const char *c = name; *c; c++)
		h = (h ^ (uint8_t)*c) * 16777619u;
	return h;
}

static void report_ready(uint64_t boot_tsc, uint64_t fill_tsc)
{
	struct line l;
	line_start(&l, "ready");
	put_kv(&l, "mem_mib");
	put_u64(&l, mem_mib);
	put_kv(&l, "ws_mib");
	put_u64(&l, ws_mib);
	put_kv(&l, "rate_mibps");
	put_fixed(&l, rate_milli, 3);
	put_kv(&l, "mode");
	put_str(&l, mode_name());
	put_kv(&l, "fill_mib");
	put_u64(&l, fill_mib);
	put_kv(&l, "work");
	put_u64(&l, work);
	put_kv(&l, "tsc_khz");
	put_u64(&l, tsc_hz / 1000);
	put_kv(&l, "region_base");
	put_hex(&l, (uint32_t)region_base);
	put_kv(&l, "region_end");
	put_hex(&l, (uint32_t)region_end);
	put_kv(&l, "fill_ms");
	put_u64(&l, fill_tsc * 1000 / tsc_hz);
	put_kv(&l, "boot_ms");
	put_u64(&l, (rdtsc() - boot_tsc) * 1000 / tsc_hz);
	put_kv(&l, "pattern");
	put_str(&l, pattern_name());
	if (!walks()) {
		put_kv(&l, "seed");
		put_u64(&l, seed);
	}
	if (pattern == PATTERN_HOTCOLD) {
		put_kv(&l, "hot_pct");
		put_u64(&l, hot_pct);
		put_kv(&l, "hot_ws_pct");
		put_u64(&l, hot_ws_pct);
	}
	if (pattern == PATTERN_BURSTY) {
		put_kv(&l, "on_ms");
		put_u64(&l, on_ms);
		put_kv(&l, "off_ms");
		put_u64(&l, off_ms);
	}
	put_kv(&l, "duty_pct");
	put_fixed(&l, pattern == PATTERN_BURSTY ? (uint64_t)on_ms * 1000 / (on_ms + off_ms) : 1000,
		  1);
	put_kv(&l, "verify");
	put_str(&l, verify_on ? "on" : "off");
	if (verify_on) {
		put_kv(&l, "verify_budget_pct");
		put_u64(&l, verify_budget_pct);
	}
	put_kv(&l, "meta_base");
	put_hex(&l, (uint32_t)meta_base);
	put_kv(&l, "meta_kib");
	put_u64(&l, meta_bytes / 1024);
	if (corrupt_after_s) {
		put_kv(&l, "corrupt_after_s");
		put_u64(&l, corrupt_after_s);
	}
	if (name[0]) {
		put_kv(&l, "name");
		put_str(&l, name);
	}
	line_send(&l);
}

void kmain(uint32_t magic, const struct mb_info *mbi)
{
	uint64_t boot_tsc = rdtsc();
	struct line l;

	serial_init();
	serial_putc('\n'); /* firmware output may have left a line open */
	line_start(&l, "boot");
	line_send(&l);
	if (magic != MB_BOOT_MAGIC)
		fail("not_multiboot", "magic", magic);
	interrupts_init();
	parse_cmdline(mbi);
	find_memory(mbi);
	/* Calibrating against the RTC goes wrong on a loaded host (the vCPU is
	 * not scheduled when the RTC ticks); the host's own figure is exact. */
	if (tsc_khz_given)
		tsc_hz = (uint64_t)tsc_khz_given * 1000u;
	else
		calibrate_tsc();

	rng = seed_given ? seed : name_hash();
	if (!rng)
		rng = 0x2545f491u;
	seed = rng;
	cycle_tsc = (uint64_t)(on_ms + off_ms) * tsc_hz / 1000;
	on_tsc = (uint64_t)on_ms * tsc_hz / 1000;

	uint64_t t0 = rdtsc();
	zero(meta_base, meta_bytes);
	write_pages(fill_base, fill_pages, 0, 0);
	write_pages(ws_base, ws_pages, fill_pages / BLOCK_PAGES, 1);
	uint64_t fill_tsc = rdtsc() - t0;

	credit_per_s = (uint64_t)rate_milli * PAGES_PER_MIB;
	denom = tsc_hz * 1000;
	credit_cap = denom * (((uint64_t)rate_milli * PAGES_PER_MIB / 1000 + 1) *
			      (mode == MODE_CPU ? CPU_CAP_TICKS : PACED_CAP_TICKS) / TICK_HZ);
	if (credit_cap < denom)
		credit_cap = denom;
	verify_on = verify_wanted && total_pages;
	verify_share = verify_budget_pct * 65536u / 100u;

	report_ready(boot_tsc, fill_tsc);

	ready_tsc = rdtsc();
	last_tick_tsc = ready_tsc;
	report_tsc = ready_tsc;
	last_verify_tsc = ready_tsc;
	sweep_start_tsc = ready_tsc;
	if (corrupt_after_s && total_pages)
		corrupt_at_tsc = ready_tsc + (uint64_t)corrupt_after_s * tsc_hz;
}
