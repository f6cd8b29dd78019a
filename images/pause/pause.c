/*
 * pause: the first process of every pod sandbox on the local node. It holds the pod's
 * namespaces, reaps the orphans re-parented to it, and exits on SIGINT or SIGTERM.
 * Built statically, so its image holds this one file.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int signal_number) {
  (void)signal_number;
  _exit(0);
}

static void on_child(int signal_number) {
  (void)signal_number;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  (void)argv;
  if (argc > 1) {
    return 0; /* `pause --version` and friends: nothing to report, and never hang a probe */
  }
  struct sigaction stop = {.sa_handler = on_stop};
  struct sigaction child = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP};
  if (sigaction(SIGINT, &stop, NULL) != 0 || sigaction(SIGTERM, &stop, NULL) != 0 ||
      sigaction(SIGCHLD, &child, NULL) != 0) {
    return 2;
  }
  for (;;) {
    pause();
  }
}
