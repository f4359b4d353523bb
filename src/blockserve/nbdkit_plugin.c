/* nbdkit-regdisk-plugin: serves a lazily-pulled chunked disk read-only.
 *
 *   nbdkit --unix SOCK --readonly nbdkit-regdisk-plugin.so \
 *          file=DIR/disk.raw map=DIR/chunks.map control=DIR/control.sock [deadline=SECONDS]
 *
 * A read whose chunks are all marked present in the bitmap (layout in
 * store/chunk_bitmap_format.h) is served from the file directly. Otherwise
 * the plugin asks the owning regdisk process over the control socket
 * (blockserve/control_protocol.h) to fetch and verify them, and serves the
 * read only once their bits are set. Nothing else is ever served: a chunk
 * whose bit stays clear fails the read with EIO, as does a read the owner
 * cannot complete within the deadline (the guest sees an I/O error rather
 * than a hung disk). An owner that does not answer (it went away) is tried
 * again until the deadline, then the read fails with EIO too.
 *
 * There is no write path: the plugin has no pwrite, so nbdkit refuses
 * writes. Every connection may read in parallel (can_multi_conn). */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-plugin.h>

#include "blockserve/control_protocol.h"
#include "store/chunk_bitmap_format.h"

static char *file_path, *map_path, *control_path;
static int64_t deadline_ms = 60000;

static int disk_fd = -1;
static int64_t disk_size;
static const unsigned char *map_base;
static size_t map_bytes;
static unsigned chunk_shift;
static uint64_t chunk_count;

static int regdisk_config(const char *key, const char *value) {
  if (strcmp(key, "file") == 0) {
    free(file_path);
    file_path = nbdkit_realpath(value);
    return file_path ? 0 : -1;
  }
  if (strcmp(key, "map") == 0) {
    free(map_path);
    map_path = nbdkit_realpath(value);
    return map_path ? 0 : -1;
  }
  if (strcmp(key, "control") == 0) {
    free(control_path);
    control_path = strdup(value);
    return control_path ? 0 : -1;
  }
  if (strcmp(key, "deadline") == 0) {
    char *end = NULL;
    long long s = strtoll(value, &end, 10);
    if (end == value || *end != '\0' || s < 1 || s > 86400) {
      nbdkit_error("deadline: want whole seconds from 1 to 86400, got %s", value);
      return -1;
    }
    deadline_ms = s * 1000;
    return 0;
  }
  nbdkit_error("unknown parameter %s (the plugin takes file, map, control and deadline)", key);
  return -1;
}

static int regdisk_config_complete(void) {
  if (!file_path || !map_path || !control_path) {
    nbdkit_error("the plugin needs file=, map= and control=");
    return -1;
  }
  if (strlen(control_path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
    nbdkit_error("control socket path too long: %s", control_path);
    return -1;
  }
  disk_fd = open(file_path, O_RDONLY | O_CLOEXEC);
  if (disk_fd < 0) {
    nbdkit_error("open %s: %m", file_path);
    return -1;
  }
  struct stat st;
  if (fstat(disk_fd, &st) != 0) {
    nbdkit_error("stat %s: %m", file_path);
    return -1;
  }
  disk_size = st.st_size;

  int mfd = open(map_path, O_RDONLY | O_CLOEXEC);
  if (mfd < 0) {
    nbdkit_error("open %s: %m", map_path);
    return -1;
  }
  struct stat ms;
  if (fstat(mfd, &ms) != 0 || ms.st_size < REGDISK_CHUNKMAP_HEADER_BYTES) {
    nbdkit_error("%s is not a chunk bitmap", map_path);
    close(mfd);
    return -1;
  }
  map_bytes = (size_t)ms.st_size;
  void *m = mmap(NULL, map_bytes, PROT_READ, MAP_SHARED, mfd, 0);
  close(mfd);
  if (m == MAP_FAILED) {
    nbdkit_error("mmap %s: %m", map_path);
    return -1;
  }
  map_base = m;
  uint32_t version, shift;
  memcpy(&version, map_base + REGDISK_CHUNKMAP_OFF_VERSION, 4);
  memcpy(&shift, map_base + REGDISK_CHUNKMAP_OFF_SHIFT, 4);
  memcpy(&chunk_count, map_base + REGDISK_CHUNKMAP_OFF_COUNT, 8);
  if (memcmp(map_base, REGDISK_CHUNKMAP_MAGIC, REGDISK_CHUNKMAP_MAGIC_BYTES) != 0 ||
      version != REGDISK_CHUNKMAP_VERSION || shift < 9 || shift > 40) {
    nbdkit_error("%s is not a version %d chunk bitmap", map_path, REGDISK_CHUNKMAP_VERSION);
    return -1;
  }
  chunk_shift = shift;
  const uint64_t want_chunks = ((uint64_t)disk_size + (UINT64_C(1) << shift) - 1) >> shift;
  if (chunk_count != want_chunks ||
      map_bytes < REGDISK_CHUNKMAP_HEADER_BYTES + ((chunk_count + 63) / 64) * 8) {
    nbdkit_error("%s describes %" PRIu64 " chunks, %s needs %" PRIu64, map_path, chunk_count, file_path,
                 want_chunks);
    return -1;
  }
  return 0;
}

static void regdisk_unload(void) {
  if (map_base) munmap((void *)map_base, map_bytes);
  if (disk_fd >= 0) close(disk_fd);
  free(file_path);
  free(map_path);
  free(control_path);
}

static int present(uint64_t k) {
  const uint64_t *words = (const uint64_t *)(map_base + REGDISK_CHUNKMAP_HEADER_BYTES);
  return (__atomic_load_n(&words[k / 64], __ATOMIC_ACQUIRE) >> (k % 64)) & 1;
}

static int range_present(uint64_t first, uint64_t last) {
  for (uint64_t k = first; k <= last; ++k) {
    if (!present(k)) return 0;
  }
  return 1;
}

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int write_all(int fd, const void *buf, size_t n) {
  const char *p = buf;
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Asks the owner to make [offset, offset + count) present; 0 or an errno. */
static int ask_owner(uint64_t offset, uint64_t count, int64_t deadline) {
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  strcpy(addr.sun_path, control_path);
  for (;;) {
    const int64_t left = deadline - now_ms();
    if (left <= 0) return ETIMEDOUT;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return errno;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
      /* The owner is restarting: try again shortly. */
      close(fd);
      struct timespec pause = {.tv_sec = 0, .tv_nsec = 200 * 1000 * 1000};
      nanosleep(&pause, NULL);
      continue;
    }
    unsigned char req[REGDISK_CONTROL_REQUEST_BYTES];
    memcpy(req, &offset, 8);
    memcpy(req + 8, &count, 8);
    if (write_all(fd, req, sizeof req) != 0) {
      close(fd);
      continue;
    }
    unsigned char reply[REGDISK_CONTROL_REPLY_BYTES];
    size_t got = 0;
    while (got < sizeof reply) {
      const int64_t wait = deadline - now_ms();
      if (wait <= 0) {
        close(fd);
        return ETIMEDOUT;
      }
      struct pollfd p = {.fd = fd, .events = POLLIN};
      int r = poll(&p, 1, wait > 1000 ? 1000 : (int)wait);
      if (r < 0 && errno == EINTR) continue;
      if (r == 0) continue;
      ssize_t n = recv(fd, reply + got, sizeof reply - got, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break; /* the owner went away mid-request */
      got += (size_t)n;
    }
    close(fd);
    if (got < sizeof reply) continue;
    int32_t err;
    memcpy(&err, reply, 4);
    return err;
  }
}

static void *regdisk_open(int readonly) {
  (void)readonly;
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t regdisk_get_size(void *handle) {
  (void)handle;
  return disk_size;
}

static int regdisk_can_multi_conn(void *handle) {
  (void)handle;
  return 1;
}

static int regdisk_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags) {
  (void)handle;
  (void)flags;
  if (count == 0) return 0;
  const uint64_t first = offset >> chunk_shift, last = (offset + count - 1) >> chunk_shift;
  if (last >= chunk_count) {
    nbdkit_set_error(EIO);
    nbdkit_error("a read of %" PRIu32 " bytes at offset %" PRIu64 " reaches beyond the %" PRId64
                 "-byte disk %s; the client must read inside the export's size",
                 count, offset, disk_size, file_path);
    return -1;
  }
  if (!range_present(first, last)) {
    const int err = ask_owner(offset, count, now_ms() + deadline_ms);
    if (err != 0 || !range_present(first, last)) {
      nbdkit_error("chunks %" PRIu64 "..%" PRIu64 " of %s (a read of %" PRIu32 " bytes at offset %" PRIu64
                   ") are not available: %s; the owner's log says why, and a later read tries again",
                   first, last, file_path, count, offset,
                   err == ETIMEDOUT ? "the registry did not deliver them in time"
                                    : (err != 0 ? strerror(err) : "not verified"));
      nbdkit_set_error(EIO);
      return -1;
    }
  }
  char *p = buf;
  while (count > 0) {
    ssize_t n = pread(disk_fd, p, count, (off_t)offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      nbdkit_error("pread %s: %m", file_path);
      nbdkit_set_error(EIO);
      return -1;
    }
    p += n;
    count -= (uint32_t)n;
    offset += (uint64_t)n;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
    .name = "regdisk",
    .longname = "regdisk lazily-pulled chunked disk",
    .description = "serves a chunked registry disk while it is fetched, verified chunk by chunk",
    .config = regdisk_config,
    .config_complete = regdisk_config_complete,
    .config_help = "file=<disk.raw> map=<chunks.map> control=<socket> [deadline=<seconds>]",
    .unload = regdisk_unload,
    .open = regdisk_open,
    .get_size = regdisk_get_size,
    .can_multi_conn = regdisk_can_multi_conn,
    .pread = regdisk_pread,
    .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN(plugin)
