/* Service-manager readiness (systemd's sd_notify protocol, through
 * libsystemd): READY when the socket accepts, RELOADING around a SIGHUP,
 * STOPPING at shutdown, and a STATUS line while loading. Without
 * $NOTIFY_SOCKET (not started by systemd) every call does nothing. */
#ifndef MOE_DAEMON_NOTIFY_H
#define MOE_DAEMON_NOTIFY_H

void moed_notify_ready(const char *status);
void moed_notify_reloading(void);
void moed_notify_stopping(void);
void moed_notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
