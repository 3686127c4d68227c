/*
 * btdev_fuse: a stand-in for the Linux BT BMC device (/dev/ipmi-bt-host,
 * drivers/char/ipmi/bt-bmc.c) as one file of a FUSE file system, so that a
 * program can own "the device" through real open/read/write/poll/ioctl
 * syscalls on a machine without the hardware.
 *
 *   btdev_fuse MOUNTDIR HOSTSOCK
 *
 * Mounts MOUNTDIR with one file, MOUNTDIR/ipmi-bt-host, and connects to
 * HOSTSOCK (a unix SOCK_SEQPACKET socket where a host simulator listens).
 * Each packet from the host is one request frame for read(); each frame
 * written to the file becomes one packet to the host; each SMS_ATN ioctl
 * sends the one-byte packet 0xB1. Two one-byte packets from the host are
 * test controls, not frames: 'B' sets H_BUSY (the host is busy: responses
 * are not taken, so POLLOUT drops and writes wait) and 'b' clears it.
 *
 * What the driver does and this file mirrors (see README.md):
 *   open     a second opener gets EBUSY;
 *   read     waits for a request whatever O_NONBLOCK says; returns one frame,
 *            [len, ...] with len+1 bytes, cut to the buffer (the rest is
 *            lost); a frame whose len is 0, or a 1-byte buffer, reads 0 bytes;
 *   write    fewer than 5 bytes: EINVAL; otherwise waits (whatever O_NONBLOCK
 *            says) until neither H_BUSY nor B2H_ATN is set, then puts the
 *            frame in the FIFO and returns; no upper bound is checked (a frame
 *            over the 64-byte FIFO is sent whole, with a warning on stderr);
 *   poll     POLLIN while a request waits, POLLOUT while neither H_BUSY nor
 *            B2H_ATN; waiters are woken with fuse_lowlevel_notify_poll;
 *   ioctl    _IO(0xb1, 0x00) raises SMS_ATN; any other command: EINVAL.
 *
 * The host "takes" a response (clears B2H_ATN) as soon as its packet is
 * sent; once the host has closed the socket nothing is taken any more, as
 * on a host that is gone: the next write goes to the FIFO, later ones wait.
 *
 * Stdout: "ready" once mounted and connected, then one line per event tests
 * may wait for: "read-blocked", "write-blocked", "host-closed". Errors and
 * warnings go to stderr. SIGTERM, SIGINT and SIGHUP unmount and exit 0.
 *
 * Single-threaded: one poll() loop over the FUSE device, the host socket
 * and a signalfd, so no locking is needed.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 31

#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define FILE_NAME "ipmi-bt-host"
#define FILE_INO 2
#define BT_BMC_IOCTL_SMS_ATN _IO(0xb1, 0x00)
#define BT_FIFO_SIZE 64
#define SMS_ATN_PACKET 0xB1
#define CTRL_HOST_BUSY 'B'
#define CTRL_HOST_IDLE 'b'
#define MAX_QUEUED 64 /* requests held before the socket is left unread */
#define RECV_SIZE 4096

struct pkt {
	struct pkt *next;
	int is_response; /* its sending clears B2H_ATN */
	size_t len;
	uint8_t data[];
};

struct pktq {
	struct pkt *head, **tail;
	unsigned n;
};

/* A read or write the driver would sleep in, answered later. */
struct waiter {
	struct waiter *next;
	fuse_req_t req;
	size_t size;     /* read: the caller's buffer size */
	struct pkt *frame; /* write: a copy of the caller's bytes */
	int interrupted;
};

static struct {
	struct fuse_session *se;
	int host_fd; /* -1 once the host is gone */
	int opened;
	int h_busy, b2h_atn;
	struct pktq requests; /* host to BMC: the H2B side */
	struct pktq out;      /* BMC to host: responses and SMS_ATN */
	struct waiter *reads, *writes;
	struct fuse_pollhandle *ph;
	unsigned last_mask;
} bt;

static void event(const char *what)
{
	char line[64];
	int n = snprintf(line, sizeof(line), "%s\n", what);
	/* Never block on stdout: a reader that stopped reading loses lines. */
	if (write(STDOUT_FILENO, line, (size_t)n) < 0 && errno != EAGAIN)
		fprintf(stderr, "btdev_fuse: stdout: %s\n", strerror(errno));
}

static void warn(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("btdev_fuse: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static struct pkt *pkt_new(const void *data, size_t len, int is_response)
{
	struct pkt *p = malloc(sizeof(*p) + len);
	if (!p) {
		warn("out of memory");
		exit(1);
	}
	p->next = NULL;
	p->is_response = is_response;
	p->len = len;
	memcpy(p->data, data, len);
	return p;
}

static void q_push(struct pktq *q, struct pkt *p)
{
	p->next = NULL;
	*q->tail = p;
	q->tail = &p->next;
	q->n++;
}

static struct pkt *q_pop(struct pktq *q)
{
	struct pkt *p = q->head;
	if (p) {
		q->head = p->next;
		if (!q->head)
			q->tail = &q->head;
		q->n--;
	}
	return p;
}

static void q_init(struct pktq *q)
{
	q->head = NULL;
	q->tail = &q->head;
	q->n = 0;
}

static void w_append(struct waiter **list, struct waiter *w)
{
	while (*list)
		list = &(*list)->next;
	w->next = NULL;
	*list = w;
}

/* -- state ------------------------------------------------------------ */

static int writable(void)
{
	return !bt.h_busy && !bt.b2h_atn;
}

static unsigned poll_mask(void)
{
	/* bt_bmc_poll: EPOLLIN on H2B_ATN, EPOLLOUT unless H_BUSY|B2H_ATN */
	return (bt.requests.n ? POLLIN : 0) | (writable() ? POLLOUT : 0);
}

static void host_closed(void)
{
	struct pkt *p;
	if (bt.host_fd < 0)
		return;
	close(bt.host_fd);
	bt.host_fd = -1;
	while ((p = q_pop(&bt.out)))
		free(p); /* a response among them stays untaken: B2H_ATN stays */
	warn("the host closed the socket: responses are no longer taken");
	event("host-closed");
}

static void send_out(void)
{
	struct pkt *p;
	while (bt.host_fd >= 0 && (p = bt.out.head)) {
		ssize_t n = send(bt.host_fd, p->data, p->len,
				 MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return; /* poll() waits for POLLOUT on the socket */
			warn("send to host: %s", strerror(errno));
			host_closed();
			return;
		}
		q_pop(&bt.out);
		if (p->is_response)
			bt.b2h_atn = 0; /* the host took it at once */
		free(p);
	}
}

/* bt_bmc_read after its wait: one frame, cut to `size`. */
static void answer_read(struct waiter *w)
{
	struct pkt *frame = q_pop(&bt.requests);
	uint8_t buf[256];
	size_t len = frame->len ? frame->data[0] : 0, i;

	if (len + 1 > w->size)
		len = w->size ? w->size - 1 : 0;
	buf[0] = frame->len ? frame->data[0] : 0;
	for (i = 1; i <= len; i++) /* past the packet, the FIFO holds nothing */
		buf[i] = i < frame->len ? frame->data[i] : 0;
	/* the driver's loop never runs for len 0, so it returns 0 bytes */
	fuse_reply_buf(w->req, (const char *)buf, len ? len + 1 : 0);
	free(frame);
}

/* bt_bmc_write after its wait: into the FIFO, B2H_ATN set, return. */
static void answer_write(struct waiter *w)
{
	size_t len = w->frame->len;
	if (len > BT_FIFO_SIZE)
		warn("a %zu-byte frame overruns the %d-byte BT FIFO (the driver "
		     "accepts it; the host would not get it intact)",
		     len, BT_FIFO_SIZE);
	bt.b2h_atn = 1;
	w->frame->is_response = 1;
	q_push(&bt.out, w->frame);
	fuse_reply_write(w->req, len);
}

static void answer_interrupted(struct waiter **list)
{
	while (*list) {
		struct waiter *w = *list;
		if (!w->interrupted) {
			list = &w->next;
			continue;
		}
		*list = w->next;
		fuse_reply_err(w->req, EINTR); /* the driver's -ERESTARTSYS */
		free(w->frame);
		free(w);
	}
}

/* Run after every event: answer whatever can be answered, wake pollers. */
static void settle(void)
{
	unsigned mask;

	answer_interrupted(&bt.reads);
	answer_interrupted(&bt.writes);
	while (bt.reads && bt.requests.n) {
		struct waiter *w = bt.reads;
		bt.reads = w->next;
		answer_read(w);
		free(w);
	}
	send_out();
	while (bt.writes && writable()) {
		struct waiter *w = bt.writes;
		bt.writes = w->next;
		answer_write(w);
		free(w);
		send_out();
	}
	mask = poll_mask();
	if (mask != bt.last_mask && bt.ph)
		fuse_lowlevel_notify_poll(bt.ph);
	bt.last_mask = mask;
}

/* -- host socket ------------------------------------------------------- */

static void host_readable(void)
{
	uint8_t buf[RECV_SIZE];
	ssize_t n = recv(bt.host_fd, buf, sizeof(buf), MSG_DONTWAIT | MSG_TRUNC);

	if (n < 0) {
		if (errno == EAGAIN || errno == EINTR)
			return;
		warn("recv from host: %s", strerror(errno));
		host_closed();
		return;
	}
	if (n == 0) {
		host_closed();
		return;
	}
	if ((size_t)n > sizeof(buf)) {
		warn("dropped a %zd-byte packet from the host", n);
		return;
	}
	if (n == 1 && buf[0] == CTRL_HOST_BUSY) {
		bt.h_busy = 1;
		return;
	}
	if (n == 1 && buf[0] == CTRL_HOST_IDLE) {
		bt.h_busy = 0;
		return;
	}
	q_push(&bt.requests, pkt_new(buf, (size_t)n, 0));
}

static int connect_host(const char *path)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	int fd;

	if (strlen(path) >= sizeof(addr.sun_path)) {
		warn("socket path too long: %s", path);
		return -1;
	}
	strcpy(addr.sun_path, path);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		warn("connect %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

/* -- FUSE operations --------------------------------------------------- */

static void fill_attr(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_uid = getuid();
	st->st_gid = getgid();
	if (ino == FUSE_ROOT_ID) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
	} else {
		st->st_mode = S_IFREG | 0600;
		st->st_nlink = 1;
	}
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;

	if (parent != FUSE_ROOT_ID || strcmp(name, FILE_NAME) != 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.ino = FILE_INO;
	e.attr_timeout = e.entry_timeout = 3600.0;
	fill_attr(FILE_INO, &e.attr);
	fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino,
		       struct fuse_file_info *fi)
{
	struct stat st;
	(void)fi;
	if (ino != FUSE_ROOT_ID && ino != FILE_INO) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fill_attr(ino, &st);
	fuse_reply_attr(req, &st, 3600.0);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	static const struct {
		const char *name;
		fuse_ino_t ino;
	} entries[] = {{".", FUSE_ROOT_ID}, {"..", FUSE_ROOT_ID},
		       {FILE_NAME, FILE_INO}};
	char buf[512];
	size_t used = 0;
	(void)fi;

	if (ino != FUSE_ROOT_ID) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	for (off_t i = off; i < 3; i++) {
		struct stat st;
		size_t n;
		fill_attr(entries[i].ino, &st);
		n = fuse_add_direntry(req, buf + used, sizeof(buf) - used,
				      entries[i].name, &st, i + 1);
		if (used + n > size || used + n > sizeof(buf))
			break;
		used += n;
	}
	fuse_reply_buf(req, buf, used);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != FILE_INO) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	if (bt.opened) { /* bt_bmc_open: open_count must go 0 -> 1 */
		fuse_reply_err(req, EBUSY);
		return;
	}
	bt.opened = 1;
	fi->direct_io = 1;   /* every read() and write() reaches us whole */
	fi->nonseekable = 1;
	fi->keep_cache = 0;
	fuse_reply_open(req, fi);
}

static void op_release(fuse_req_t req, fuse_ino_t ino,
		       struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	bt.opened = 0;
	if (bt.ph) {
		fuse_pollhandle_destroy(bt.ph);
		bt.ph = NULL;
	}
	fuse_reply_err(req, 0);
}

static void on_interrupt(fuse_req_t req, void *data)
{
	/* Called with libfuse's request lock held: only mark it; settle()
	 * answers EINTR once the current request is processed. */
	(void)req;
	((struct waiter *)data)->interrupted = 1;
}

static struct waiter *waiter_new(fuse_req_t req)
{
	struct waiter *w = calloc(1, sizeof(*w));
	if (!w) {
		warn("out of memory");
		exit(1);
	}
	w->req = req;
	return w;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	struct waiter *w = waiter_new(req);
	(void)ino;
	(void)off;
	(void)fi; /* fi->flags & O_NONBLOCK is ignored, as by the driver */
	w->size = size;
	w_append(&bt.reads, w);
	fuse_req_interrupt_func(req, on_interrupt, w);
	if (!bt.requests.n)
		event("read-blocked");
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf,
		     size_t size, off_t off, struct fuse_file_info *fi)
{
	struct waiter *w;
	(void)ino;
	(void)off;
	(void)fi;
	if (size < 5) { /* "send a minimum response size" */
		fuse_reply_err(req, EINVAL);
		return;
	}
	w = waiter_new(req);
	w->frame = pkt_new(buf, size, 1);
	w_append(&bt.writes, w);
	fuse_req_interrupt_func(req, on_interrupt, w);
	if (!writable() || w != bt.writes)
		event("write-blocked");
}

static void op_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
		    struct fuse_pollhandle *ph)
{
	(void)ino;
	(void)fi;
	if (ph) {
		if (bt.ph)
			fuse_pollhandle_destroy(bt.ph);
		bt.ph = ph;
	}
	fuse_reply_poll(req, poll_mask());
}

static void op_ioctl(fuse_req_t req, fuse_ino_t ino, int cmd, void *arg,
		     struct fuse_file_info *fi, unsigned flags,
		     const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
	(void)ino;
	(void)arg;
	(void)fi;
	(void)flags;
	(void)in_buf;
	(void)in_bufsz;
	(void)out_bufsz;
	if ((unsigned int)cmd != BT_BMC_IOCTL_SMS_ATN) {
		fuse_reply_err(req, EINVAL); /* bt_bmc_ioctl's default */
		return;
	}
	if (bt.host_fd >= 0 && bt.out.n < MAX_QUEUED) {
		uint8_t atn = SMS_ATN_PACKET;
		q_push(&bt.out, pkt_new(&atn, 1, 0));
	}
	fuse_reply_ioctl(req, 0, NULL, 0);
}

static const struct fuse_lowlevel_ops ops = {
	.lookup = op_lookup,
	.getattr = op_getattr,
	.readdir = op_readdir,
	.open = op_open,
	.release = op_release,
	.read = op_read,
	.write = op_write,
	.poll = op_poll,
	.ioctl = op_ioctl,
};

/* -- main loop ----------------------------------------------------------- */

int main(int argc, char **argv)
{
	char *fargv[] = {argv[0], "-o", "fsname=btdev_fuse,subtype=btdev", NULL};
	struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
	struct fuse_buf fbuf = {.mem = NULL};
	struct stat st;
	sigset_t sigs;
	int sfd, ffd, status = 0, running = 1;

	if (argc != 3) {
		fprintf(stderr, "usage: %s MOUNTDIR HOSTSOCK\n", argv[0]);
		return 2;
	}
	q_init(&bt.requests);
	q_init(&bt.out);
	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	sigprocmask(SIG_BLOCK, &sigs, NULL);
	sfd = signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0) {
		warn("signalfd: %s", strerror(errno));
		return 1;
	}
	if (fstat(STDOUT_FILENO, &st) == 0 && S_ISFIFO(st.st_mode))
		fcntl(STDOUT_FILENO, F_SETFL,
		      fcntl(STDOUT_FILENO, F_GETFL) | O_NONBLOCK);

	bt.host_fd = connect_host(argv[2]);
	if (bt.host_fd < 0)
		return 1;
	bt.se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	if (!bt.se)
		return 1;
	if (fuse_session_mount(bt.se, argv[1]) != 0) {
		warn("cannot mount %s", argv[1]);
		fuse_session_destroy(bt.se);
		return 1;
	}
	ffd = fuse_session_fd(bt.se);
	/* A request can be withdrawn between poll() and read(): never block. */
	fcntl(ffd, F_SETFL, fcntl(ffd, F_GETFL) | O_NONBLOCK);
	bt.last_mask = poll_mask();
	event("ready");

	while (running && !fuse_session_exited(bt.se)) {
		struct pollfd pfd[3] = {
			{.fd = sfd, .events = POLLIN},
			{.fd = ffd, .events = POLLIN},
			{.fd = bt.host_fd, .events = 0},
		};
		if (bt.requests.n < MAX_QUEUED)
			pfd[2].events |= POLLIN;
		if (bt.out.n)
			pfd[2].events |= POLLOUT;
		if (poll(pfd, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			warn("poll: %s", strerror(errno));
			status = 1;
			break;
		}
		if (pfd[0].revents) {
			running = 0;
			break;
		}
		if (pfd[1].revents) {
			int res = fuse_session_receive_buf(bt.se, &fbuf);
			if (res > 0)
				fuse_session_process_buf(bt.se, &fbuf);
			else if (res == 0)
				break; /* unmounted under us */
			else if (res != -EINTR && res != -EAGAIN) {
				status = 1;
				break;
			}
		}
		if (bt.host_fd >= 0 && pfd[2].revents) {
			if (pfd[2].revents & (POLLIN | POLLHUP | POLLERR))
				host_readable();
		}
		settle();
	}
	free(fbuf.mem);
	fuse_session_unmount(bt.se);
	fuse_session_destroy(bt.se);
	return status;
}
