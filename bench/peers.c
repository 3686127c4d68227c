/* Lean C stand-ins for the bench's peers, built on sd-bus as the real
 * btbridged and hiomapd are.  They carry only what a round trip needs, so
 * that the bench's bt:-versus-btbridged ratio compares the bridge's two
 * host modes with peers that cost what the real daemons cost, instead of
 * the Python emulator's own work (which both modes would share).
 *
 *   peers hiomapd ADDRESS
 *       Owns xyz.openbmc_project.Hiomapd on the bus at ADDRESS and serves
 *       the Protocol and Protocol.V2 methods the bridge calls, with the four
 *       event properties (DaemonReady true, the others false) for GetAll.
 *       Windows are answered arithmetically (no flash behind them): a
 *       CreateReadWindow at block OFFSET of SIZE blocks maps SIZE blocks
 *       (at most one 1 MiB window) at LPC block OFFSET.
 *
 *   peers btbridged ADDRESS SEAM
 *       Connects to the SOCK_SEQPACKET seam at SEAM as the BT owner (the
 *       same seam and frame format the bridge's --host bt: mode uses), owns
 *       org.openbmc.HostIpmi and does per request what btbridged does
 *       (below): each request frame becomes a ReceivedMessage(yyyyay)
 *       signal; sendMessage(yyyyyay) -> x writes the response frame and
 *       then returns 0; setAttention() -> x sends the one-byte packet 0xB1.
 *       Exits 0 when the host closes the seam.
 *
 * Both announce READY=1 on NOTIFY_SOCKET once their name is owned.  Built
 * by bench/run.py (cc -O2 ... $(pkg-config --cflags --libs libsystemd)).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

#include <systemd/sd-bus.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>

#define HIOMAPD_NAME "xyz.openbmc_project.Hiomapd"
#define HIOMAPD_PATH "/xyz/openbmc_project/Hiomapd"
#define IFACE_PROTOCOL "xyz.openbmc_project.Hiomapd.Protocol"
#define IFACE_V2 "xyz.openbmc_project.Hiomapd.Protocol.V2"

#define HOSTIPMI_NAME "org.openbmc.HostIpmi"
#define HOSTIPMI_PATH "/org/openbmc/HostIpmi/1"
#define HOSTIPMI_IFACE "org.openbmc.HostIpmi"

#define BLOCK_SHIFT 12
#define FLASH_BLOCKS 2048   /* 8 MiB of 4 KiB blocks, as the emulator */
#define WINDOW_BLOCKS 256   /* 1 MiB */
#define BT_FRAME_MAX 64
#define ATTENTION 0xB1

static int fail(const char *what, int r)
{
	fprintf(stderr, "peers: %s: %s\n", what, strerror(r < 0 ? -r : r));
	return 1;
}

/* -- hiomapd ------------------------------------------------------------ */

static int empty_reply(sd_bus_message *m, void *u, sd_bus_error *e)
{
	(void)u;
	(void)e;
	return sd_bus_reply_method_return(m, "");
}

static int get_info(sd_bus_message *m, void *u, sd_bus_error *e)
{
	uint8_t version;
	int r = sd_bus_message_read(m, "y", &version);
	(void)u;
	if (r < 0)
		return r;
	if (version < 2)
		return sd_bus_error_set_errno(e, EINVAL);
	return sd_bus_reply_method_return(m, "yyq", 2, BLOCK_SHIFT, 1);
}

static int get_flash_info(sd_bus_message *m, void *u, sd_bus_error *e)
{
	(void)u;
	(void)e;
	return sd_bus_reply_method_return(m, "qq", FLASH_BLOCKS, 1);
}

static int create_window(sd_bus_message *m, void *u, sd_bus_error *e)
{
	uint16_t offset, size;
	int r = sd_bus_message_read(m, "qq", &offset, &size);
	(void)u;
	if (r < 0)
		return r;
	if (offset >= FLASH_BLOCKS)
		return sd_bus_error_set_errno(e, EINVAL);
	if (size == 0 || size > WINDOW_BLOCKS)
		size = WINDOW_BLOCKS;
	if (size > FLASH_BLOCKS - offset)
		size = FLASH_BLOCKS - offset;
	return sd_bus_reply_method_return(m, "qqq", offset, size, offset);
}

static int one_arg(sd_bus_message *m, void *u, sd_bus_error *e)
{
	uint8_t arg;
	int r = sd_bus_message_read(m, "y", &arg);
	(void)u;
	(void)e;
	if (r < 0)
		return r;
	return sd_bus_reply_method_return(m, "");
}

static int two_args(sd_bus_message *m, void *u, sd_bus_error *e)
{
	uint16_t a, b;
	int r = sd_bus_message_read(m, "qq", &a, &b);
	(void)u;
	(void)e;
	if (r < 0)
		return r;
	return sd_bus_reply_method_return(m, "");
}

static int property(sd_bus *bus, const char *path, const char *iface,
		    const char *name, sd_bus_message *reply, void *u,
		    sd_bus_error *e)
{
	(void)bus;
	(void)path;
	(void)iface;
	(void)u;
	(void)e;
	return sd_bus_message_append(reply, "b", strcmp(name, "DaemonReady") == 0);
}

static const sd_bus_vtable protocol_vtable[] = {
	SD_BUS_VTABLE_START(0),
	SD_BUS_METHOD("Reset", "", "", empty_reply, 0),
	SD_BUS_METHOD("GetInfo", "y", "yyq", get_info, 0),
	SD_BUS_VTABLE_END,
};

static const sd_bus_vtable v2_vtable[] = {
	SD_BUS_VTABLE_START(0),
	SD_BUS_METHOD("GetFlashInfo", "", "qq", get_flash_info, 0),
	SD_BUS_METHOD("CreateReadWindow", "qq", "qqq", create_window, 0),
	SD_BUS_METHOD("CreateWriteWindow", "qq", "qqq", create_window, 0),
	SD_BUS_METHOD("CloseWindow", "y", "", one_arg, 0),
	SD_BUS_METHOD("MarkDirty", "qq", "", two_args, 0),
	SD_BUS_METHOD("Erase", "qq", "", two_args, 0),
	SD_BUS_METHOD("Flush", "", "", empty_reply, 0),
	SD_BUS_METHOD("Ack", "y", "", one_arg, 0),
	SD_BUS_PROPERTY("DaemonReady", "b", property, 0,
			SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
	SD_BUS_PROPERTY("FlashControlLost", "b", property, 0,
			SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
	SD_BUS_PROPERTY("WindowReset", "b", property, 0,
			SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
	SD_BUS_PROPERTY("ProtocolReset", "b", property, 0,
			SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
	SD_BUS_VTABLE_END,
};

/* -- btbridged ----------------------------------------------------------
 *
 * Per request it does the work the real btbridged does (openbmc/btbridge):
 * a poll() round over the bus, the BT interface and a timerfd; the request
 * queued (with its start time) and the timerfd armed for BT_TIMEOUT when the
 * queue was empty; ReceivedMessage sent; sendMessage matched to its request
 * by seq ("No matching request" otherwise), the write left to the next
 * round in which the interface is writable, the timer moved to the next
 * request or disarmed, the response written, and only then the method
 * return (when one is expected).  A request unanswered after BT_TIMEOUT is
 * answered cc 0xCE.
 */

#define BT_TIMEOUT 1 /* seconds, as btbridged's */
#define CC_TIMEOUT 0xCE

struct request {
	uint8_t seq, netfn, lun, cmd;
	struct timespec start;
	int answered;
	uint8_t frame[BT_FRAME_MAX];
	size_t frame_len;
	sd_bus_message *call;
	struct request *next;
};

struct btbridged {
	sd_bus *bus;
	int seam;
	int timer;
	int want_write;
	struct request *queue;
};

static void arm_timer(struct btbridged *b, const struct request *head)
{
	struct itimerspec ts = {0};
	if (head) {
		ts.it_value = head->start;
		ts.it_value.tv_sec += BT_TIMEOUT;
	}
	if (timerfd_settime(b->timer, TFD_TIMER_ABSTIME, &ts, NULL) < 0)
		fprintf(stderr, "peers: timerfd_settime: %s\n", strerror(errno));
}

static struct request *find_seq(struct btbridged *b, uint8_t seq)
{
	struct request *r = b->queue;
	while (r && (r->seq != seq || r->answered))
		r = r->next;
	return r;
}

static void set_response(struct request *r, uint8_t netfn, uint8_t lun,
			 uint8_t cc, const void *data, size_t size)
{
	r->frame[0] = (uint8_t)(size + 4);
	r->frame[1] = (uint8_t)((netfn << 2) | (lun & 3));
	r->frame[2] = r->seq;
	r->frame[3] = r->cmd;
	r->frame[4] = cc;
	if (size)
		memcpy(r->frame + 5, data, size);
	r->frame_len = size + 5;
	r->answered = 1;
}

static int send_message(sd_bus_message *m, void *u, sd_bus_error *e)
{
	struct btbridged *b = u;
	struct request *req;
	uint8_t seq, netfn, lun, cmd, cc;
	const void *data;
	size_t size;
	int r = sd_bus_message_read(m, "yyyyy", &seq, &netfn, &lun, &cmd, &cc);
	if (r < 0)
		return r;
	r = sd_bus_message_read_array(m, 'y', &data, &size);
	if (r < 0)
		return r;
	if (size + 5 > BT_FRAME_MAX)
		return sd_bus_error_set_errno(e, EMSGSIZE);
	req = find_seq(b, seq);
	if (!req)
		return sd_bus_error_set_const(e, "org.openbmc.error",
					      "No matching request");
	set_response(req, netfn, lun, cc, data, size);
	req->call = sd_bus_message_ref(m);
	b->want_write = 1;
	return 1; /* answered once written */
}

static int set_attention(sd_bus_message *m, void *u, sd_bus_error *e)
{
	struct btbridged *b = u;
	static const uint8_t atn = ATTENTION;
	if (send(b->seam, &atn, 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
		return sd_bus_error_set_errno(e, errno);
	return sd_bus_reply_method_return(m, "x", (int64_t)0);
}

static const sd_bus_vtable hostipmi_vtable[] = {
	SD_BUS_VTABLE_START(0),
	SD_BUS_METHOD("sendMessage", "yyyyyay", "x", send_message, 0),
	SD_BUS_METHOD("setAttention", "", "x", set_attention, 0),
	SD_BUS_SIGNAL("ReceivedMessage", "yyyyay", 0),
	SD_BUS_VTABLE_END,
};

/* One request frame from the host; 0 at end of file, -errno on error. */
static int read_request(struct btbridged *b)
{
	uint8_t frame[256];
	struct request *req, **tail;
	sd_bus_message *sig = NULL;
	ssize_t n = recv(b->seam, frame, sizeof(frame), MSG_DONTWAIT);
	int r;
	if (n < 0)
		return errno == EAGAIN || errno == EINTR ? 1 : -errno;
	if (n == 0)
		return 0;
	if (n < 4 || frame[0] != n - 1) {
		fprintf(stderr, "peers: dropping a malformed %zd-byte frame\n", n);
		return 1;
	}
	req = calloc(1, sizeof(*req));
	if (!req)
		return -ENOMEM;
	req->seq = frame[2];
	req->netfn = frame[1] >> 2;
	req->lun = frame[1] & 3;
	req->cmd = frame[3];
	clock_gettime(CLOCK_MONOTONIC, &req->start);
	for (tail = &b->queue; *tail; tail = &(*tail)->next)
		;
	*tail = req;
	if (b->queue == req)
		arm_timer(b, req);
	r = sd_bus_message_new_signal(b->bus, &sig, HOSTIPMI_PATH, HOSTIPMI_IFACE,
				      "ReceivedMessage");
	if (r >= 0)
		r = sd_bus_message_append(sig, "yyyy", req->seq, req->netfn,
					  req->lun, req->cmd);
	if (r >= 0)
		r = sd_bus_message_append_array(sig, 'y', frame + 4, (size_t)n - 4);
	if (r >= 0)
		r = sd_bus_send(b->bus, sig, NULL);
	sd_bus_message_unref(sig);
	return r < 0 ? r : 1;
}

/* Write the first answered request's response, then return its call. */
static void write_response(struct btbridged *b)
{
	struct request **link = &b->queue, *req;
	int err = 0;
	while (*link && !(*link)->answered)
		link = &(*link)->next;
	req = *link;
	if (req) {
		if (req == b->queue)
			arm_timer(b, req->next);
		if (send(b->seam, req->frame, req->frame_len, MSG_NOSIGNAL) < 0)
			err = errno;
		if (req->call) {
			if (err)
				sd_bus_reply_method_errno(req->call, err, NULL);
			else
				sd_bus_reply_method_return(req->call, "x", (int64_t)0);
			sd_bus_message_unref(req->call);
		}
		*link = req->next;
		free(req);
	}
	for (req = b->queue; req && !req->answered; req = req->next)
		;
	b->want_write = req != NULL;
}

static void expire_head(struct btbridged *b)
{
	uint64_t count;
	struct request *head = b->queue;
	if (read(b->timer, &count, sizeof(count)) < 0 || !head || head->answered)
		return;
	set_response(head, head->netfn + 1, head->lun, CC_TIMEOUT, NULL, 0);
	b->want_write = 1;
}

static int run_btbridged(struct btbridged *b)
{
	struct pollfd fds[3] = {
		{.fd = sd_bus_get_fd(b->bus), .events = POLLIN},
		{.fd = b->seam, .events = POLLIN},
		{.fd = b->timer, .events = POLLIN},
	};
	uint64_t timeout = UINT64_MAX;
	int r;
	for (;;) {
		fds[1].events = POLLIN | (b->want_write ? POLLOUT : 0);
		r = poll(fds, 3, timeout == 0 ? 0 : 1000);
		if (r < 0 && errno == EINTR)
			continue; /* revents are stale: poll again */
		if (r < 0)
			return -errno;
		if (fds[0].revents || timeout == 0) {
			r = sd_bus_process(b->bus, NULL);
			if (r < 0)
				return r;
		}
		if (fds[1].revents & POLLIN) {
			r = read_request(b);
			if (r <= 0)
				return r; /* the host closed the seam: done */
		} else if (fds[1].revents & (POLLERR | POLLHUP)) {
			return 0; /* gone without a last packet */
		}
		if (fds[1].revents & POLLOUT && b->want_write)
			write_response(b);
		if (fds[2].revents & POLLIN)
			expire_head(b);
		/* Messages sd-bus has read but not dispatched yet: go again. */
		if (sd_bus_get_timeout(b->bus, &timeout) < 0)
			timeout = UINT64_MAX;
	}
}

static int seam_connect(const char *path)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (strlen(path) >= sizeof(addr.sun_path)) {
		close(fd);
		return -ENAMETOOLONG;
	}
	strcpy(addr.sun_path, path);
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		int r = -errno;
		close(fd);
		return r;
	}
	return fd;
}

/* -- main --------------------------------------------------------------- */

int main(int argc, char **argv)
{
	struct btbridged b = {.seam = -1, .timer = -1};
	sd_event *event = NULL;
	const char *name;
	int r;

	if (argc < 3 || (strcmp(argv[1], "hiomapd") && strcmp(argv[1], "btbridged")) ||
	    (!strcmp(argv[1], "btbridged") && argc < 4)) {
		fprintf(stderr, "usage: peers hiomapd ADDRESS | peers btbridged ADDRESS SEAM\n");
		return 2;
	}
	r = sd_bus_new(&b.bus);
	if (r >= 0)
		r = sd_bus_set_address(b.bus, argv[2]);
	if (r >= 0)
		r = sd_bus_set_bus_client(b.bus, 1);
	if (r >= 0)
		r = sd_bus_start(b.bus);
	if (r < 0)
		return fail("connecting to the bus", r);
	if (!strcmp(argv[1], "hiomapd")) {
		name = HIOMAPD_NAME;
		r = sd_bus_add_object_vtable(b.bus, NULL, HIOMAPD_PATH, IFACE_PROTOCOL,
					     protocol_vtable, NULL);
		if (r >= 0)
			r = sd_bus_add_object_vtable(b.bus, NULL, HIOMAPD_PATH, IFACE_V2,
						     v2_vtable, NULL);
	} else {
		name = HOSTIPMI_NAME;
		b.seam = seam_connect(argv[3]);
		if (b.seam < 0)
			return fail(argv[3], b.seam);
		b.timer = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
		if (b.timer < 0)
			return fail("timerfd_create", errno);
		r = sd_bus_add_object_vtable(b.bus, NULL, HOSTIPMI_PATH, HOSTIPMI_IFACE,
					     hostipmi_vtable, &b);
	}
	if (r < 0)
		return fail("serving the object", r);
	r = sd_bus_request_name(b.bus, name, 0);
	if (r < 0)
		return fail(name, r);
	if (b.seam >= 0) {
		sd_notify(0, "READY=1");
		r = run_btbridged(&b);
	} else {
		r = sd_event_default(&event);
		if (r >= 0)
			r = sd_bus_attach_event(b.bus, event, SD_EVENT_PRIORITY_NORMAL);
		if (r < 0)
			return fail("sd-event", r);
		sd_notify(0, "READY=1");
		r = sd_event_loop(event);
		sd_event_unref(event);
	}
	sd_bus_flush_close_unref(b.bus);
	return r < 0 ? fail("event loop", r) : 0;
}
