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
 *       org.openbmc.HostIpmi and behaves as btbridged does: each request
 *       frame becomes a ReceivedMessage(yyyyay) signal; sendMessage
 *       (yyyyyay) -> x writes the response frame to the seam and then
 *       returns 0; setAttention() -> x sends the one-byte packet 0xB1.
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
#include <sys/epoll.h>
#include <sys/socket.h>
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

/* -- btbridged ---------------------------------------------------------- */

struct btbridged {
	sd_bus *bus;
	sd_event *event;
	int seam;
};

static int seam_send(struct btbridged *b, const uint8_t *buf, size_t len)
{
	if (send(b->seam, buf, len, MSG_NOSIGNAL) < 0)
		return -errno;
	return 0;
}

static int send_message(sd_bus_message *m, void *u, sd_bus_error *e)
{
	struct btbridged *b = u;
	uint8_t seq, netfn, lun, cmd, cc, frame[BT_FRAME_MAX];
	const void *data;
	size_t size;
	int r = sd_bus_message_read(m, "yyyyy", &seq, &netfn, &lun, &cmd, &cc);
	if (r < 0)
		return r;
	r = sd_bus_message_read_array(m, 'y', &data, &size);
	if (r < 0)
		return r;
	if (size + 5 > sizeof(frame))
		return sd_bus_error_set_errno(e, EMSGSIZE);
	frame[0] = (uint8_t)(size + 4);
	frame[1] = (uint8_t)((netfn << 2) | (lun & 3));
	frame[2] = seq;
	frame[3] = cmd;
	frame[4] = cc;
	memcpy(frame + 5, data, size);
	r = seam_send(b, frame, size + 5);
	if (r < 0)
		return sd_bus_error_set_errno(e, -r);
	return sd_bus_reply_method_return(m, "x", (int64_t)0);
}

static int set_attention(sd_bus_message *m, void *u, sd_bus_error *e)
{
	static const uint8_t atn = ATTENTION;
	int r = seam_send(u, &atn, 1);
	if (r < 0)
		return sd_bus_error_set_errno(e, -r);
	return sd_bus_reply_method_return(m, "x", (int64_t)0);
}

static const sd_bus_vtable hostipmi_vtable[] = {
	SD_BUS_VTABLE_START(0),
	SD_BUS_METHOD("sendMessage", "yyyyyay", "x", send_message, 0),
	SD_BUS_METHOD("setAttention", "", "x", set_attention, 0),
	SD_BUS_SIGNAL("ReceivedMessage", "yyyyay", 0),
	SD_BUS_VTABLE_END,
};

static int seam_readable(sd_event_source *s, int fd, uint32_t revents, void *u)
{
	struct btbridged *b = u;
	uint8_t frame[256];
	sd_bus_message *sig = NULL;
	ssize_t n;
	int r;
	(void)s;
	(void)revents;
	n = recv(fd, frame, sizeof(frame), MSG_DONTWAIT);
	if (n < 0)
		return errno == EAGAIN || errno == EINTR ? 0 : -errno;
	if (n == 0)
		return sd_event_exit(b->event, 0);
	if (n < 4 || frame[0] != n - 1) {
		fprintf(stderr, "peers: dropping a malformed %zd-byte frame\n", n);
		return 0;
	}
	r = sd_bus_message_new_signal(b->bus, &sig, HOSTIPMI_PATH, HOSTIPMI_IFACE,
				      "ReceivedMessage");
	if (r >= 0)
		r = sd_bus_message_append(sig, "yyyy", frame[2], frame[1] >> 2,
					  frame[1] & 3, frame[3]);
	if (r >= 0)
		r = sd_bus_message_append_array(sig, 'y', frame + 4, (size_t)n - 4);
	if (r >= 0)
		r = sd_bus_send(b->bus, sig, NULL);
	sd_bus_message_unref(sig);
	return r < 0 ? r : 0;
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
	struct btbridged b = {.seam = -1};
	const char *name;
	int r;

	if (argc < 3 || (strcmp(argv[1], "hiomapd") && strcmp(argv[1], "btbridged")) ||
	    (!strcmp(argv[1], "btbridged") && argc < 4)) {
		fprintf(stderr, "usage: peers hiomapd ADDRESS | peers btbridged ADDRESS SEAM\n");
		return 2;
	}
	r = sd_event_default(&b.event);
	if (r < 0)
		return fail("sd_event_default", r);
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
		r = sd_event_add_io(b.event, NULL, b.seam, EPOLLIN, seam_readable, &b);
		if (r >= 0)
			r = sd_bus_add_object_vtable(b.bus, NULL, HOSTIPMI_PATH,
						     HOSTIPMI_IFACE, hostipmi_vtable, &b);
	}
	if (r < 0)
		return fail("serving the object", r);
	r = sd_bus_request_name(b.bus, name, 0);
	if (r < 0)
		return fail(name, r);
	r = sd_bus_attach_event(b.bus, b.event, SD_EVENT_PRIORITY_NORMAL);
	if (r < 0)
		return fail("sd_bus_attach_event", r);
	sd_notify(0, "READY=1");
	r = sd_event_loop(b.event);
	sd_bus_flush_close_unref(b.bus);
	sd_event_unref(b.event);
	return r < 0 ? fail("event loop", r) : 0;
}
