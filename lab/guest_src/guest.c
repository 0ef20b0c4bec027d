/*
 * The lab guest: a multiboot kernel that dirties memory at a known rate.
 *
 * Command line (multiboot), all optional:
 *   ws=<MiB>       working set rewritten cyclically (default 64)
 *   rate=<MiB/s>   target dirty rate, up to three decimals (default 0)
 *   mode=paced|cpu paced: touch rate/100 per 10 ms tick, one word per page;
 *                  cpu: rewrite whole pages `work` times each, as far as the
 *                  vCPU allows, so vCPU throttling slows it (default paced)
 *   fill=<MiB>|max static data written once at boot (default 0)
 *   work=<passes>  passes over each page in cpu mode (default DEFAULT_WORK)
 *   name=<text>    echoed in the ready line
 *
 * Serial (COM1) lines, documented and parsed in lab/guest.py:
 *   hmguest event=boot ...
 *   hmguest event=ready ...
 *   hmguest event=progress ...   (about once a second)
 *   hmguest event=error reason=...
 *
 * Time comes from the TSC, calibrated against the CMOS RTC; the PIT gives a
 * 100 Hz tick that wakes the idle loop. Work is owed by elapsed TSC time, so
 * ticks lost while the vCPU was descheduled are made up, within a bound.
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
static uint32_t ws_pages;
static uint32_t ws_cursor;

/* Time and accounting. */
static uint64_t tsc_hz;
static uint64_t ready_tsc;
static uint64_t last_tick_tsc;
static uint64_t credit;       /* pages owed x denom */
static uint64_t credit_per_s; /* pages per second x 1000 */
static uint64_t denom;        /* tsc_hz x 1000: one page of credit */
static uint64_t credit_cap;
static uint64_t dirtied_pages;
static uint64_t busy_tsc;
static uint64_t report_tsc;
static uint64_t report_pages;
static uint64_t report_busy;
static uint32_t mix = 0x9e3779b9u;

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
	char buf[320];
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
		put_u64(&l, need / MIB);
		put_kv(&l, "avail_mib");
		put_u64(&l, avail / MIB);
		line_send(&l);
		halt_forever();
	}
	if (rate_milli && !ws_mib)
		fail("empty_working_set", NULL, 0);
	fill_base = region_base;
	ws_base = region_base + fill_mib * MIB;
	ws_pages = ws_mib * PAGES_PER_MIB;
}

/*
 * Non-zero data, a different word in every page, written once. One string
 * instruction per page: where the guest's instructions are emulated (this
 * lab's nested KVM) that is hundreds of times cheaper than a loop.
 */
static void write_pattern(uintptr_t base, uint32_t mib, uint32_t seed)
{
	uint32_t pages = mib * PAGES_PER_MIB;
	uint32_t *dst = (uint32_t *)base;
	for (uint32_t i = 0; i < pages; i++) {
		uint32_t words = PAGE_WORDS;
		seed = seed * 1664525u + 1013904223u;
		__asm__ volatile("rep stosl" : "+D"(dst), "+c"(words) : "a"(seed | 1u) : "memory");
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

/*
 * paced: one store per page dirties it. Runs of contiguous pages are
 * written by an unrolled loop: few instructions per page matter where
 * they are emulated.
 */
static void dirty_paced(uint32_t pages)
{
	uint32_t v = mix;
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
		v++;
		ws_cursor += run;
		if (ws_cursor == ws_pages)
			ws_cursor = 0;
		pages -= run;
		dirtied_pages += run;
	}
	mix = v;
}

/*
 * cpu: rewrite the whole page `work` times; each pass stores a value
 * derived from what the previous pass left, so no pass can be skipped.
 */
static void dirty_cpu(uint32_t pages)
{
	uint32_t v = mix;
	for (uint32_t i = 0; i < pages; i++) {
		uint32_t *page = (uint32_t *)(ws_base + (uintptr_t)ws_cursor * PAGE_SIZE);
		if (++ws_cursor == ws_pages)
			ws_cursor = 0;
		for (uint32_t pass = 0; pass < work; pass++) {
			uint32_t *dst = page;
			uint32_t words = PAGE_WORDS;
			v = (v ^ *(volatile uint32_t *)(page + (v & (PAGE_WORDS - 1)))) * 1664525u + 1u;
			__asm__ volatile("rep stosl" : "+D"(dst), "+c"(words) : "a"(v) : "memory");
		}
		dirtied_pages++;
	}
	mix = v;
}

static void report(uint64_t now)
{
	uint64_t dt = now - report_tsc;
	uint64_t pages = dirtied_pages - report_pages;
	uint64_t busy = busy_tsc - report_busy;
	report_tsc = now;
	report_pages = dirtied_pages;
	report_busy = busy_tsc;
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
	put_fixed(&l, pages * 1000 * tsc_hz / (dt * PAGES_PER_MIB), 3);
	put_kv(&l, "busy_pct");
	put_fixed(&l, busy * 1000 / dt, 1);
	put_kv(&l, "ws_mib");
	put_u64(&l, ws_mib);
	put_kv(&l, "mode");
	put_str(&l, mode_name());
	line_send(&l);
}

void tick(void)
{
	uint64_t now = rdtsc();
	outb(0x20, 0x20); /* ack now: interrupts stay off until the idle loop */
	uint64_t dt = now - last_tick_tsc;
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
		else
			dirty_paced((uint32_t)owed);
	}
	if (now - report_tsc >= tsc_hz)
		report(now);
	busy_tsc += rdtsc() - now;
}

/* ---- entry ---- */

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

	uint64_t t0 = rdtsc();
	write_pattern(fill_base, fill_mib, 0x2545f491u);
	write_pattern(ws_base, ws_mib, 0x9e3779b9u);
	uint64_t fill_tsc = rdtsc() - t0;

	credit_per_s = (uint64_t)rate_milli * PAGES_PER_MIB;
	denom = tsc_hz * 1000;
	credit_cap = denom * (((uint64_t)rate_milli * PAGES_PER_MIB / 1000 + 1) *
			      (mode == MODE_CPU ? CPU_CAP_TICKS : PACED_CAP_TICKS) / TICK_HZ);
	if (credit_cap < denom)
		credit_cap = denom;

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
	if (name[0]) {
		put_kv(&l, "name");
		put_str(&l, name);
	}
	line_send(&l);

	ready_tsc = rdtsc();
	last_tick_tsc = ready_tsc;
	report_tsc = ready_tsc;
}
