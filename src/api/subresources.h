// A VirtualMachineInstance's runtime subresources, under KubeVirt's
// subresources.kubevirt.io/v1 group:
//
//   /apis/subresources.kubevirt.io/v1/namespaces/NS/virtualmachineinstances/NAME/SUB
//
//   console  GET with `Connection: Upgrade` and `Upgrade: tcp`: 101
//            Switching Protocols, then the connection is the guest's
//            serial console, raw bytes both ways, until either side closes
//            (KubeVirt speaks a websocket here; regdisk's plain HTTP/1.1
//            upgrade is what Docker's attach does). One client at a time:
//            QEMU serves the console to one connection, a second waits.
//   log      GET: the serial console's log as text/plain; `follow=true`
//            keeps the response open and streams what the guest writes
//            until the VMI's QEMU is gone, the client hangs up or the
//            server stops.
//   ports    GET: {"kind":"PublishedPortList","ports":[{"name","protocol",
//            "port","hostIP","hostPort"}]}, the host ports forwarded to
//            the guest (from the VMI's regdisk.io/published-ports
//            annotation, which the node writes when QEMU starts).
//
// Errors are metav1.Status: 404 for an unknown VMI or subresource, 400
// when the VMI has no QEMU (console) or no log yet, 405 for other methods.
//
// Where a VMI's files are is the node's business, not the API's: the
// server asks a VmiRuntimeFn (the daemon's, wired by `regdisk serve`).
#pragma once

#include <filesystem>
#include <functional>
#include <string>

#include "api/http_server.h"
#include "state/object_store.h"
#include "util/status.h"

namespace regdisk::api {

inline constexpr char kSubresourceGroup[] = "subresources.kubevirt.io";

struct VmiRuntime {
  std::filesystem::path log_file;        // may not exist yet; empty: none
  std::filesystem::path console_socket;  // empty when no QEMU runs for the VMI
};

// Called with the VMI's namespace, name and uid, from any thread.
using VmiRuntimeFn = std::function<VmiRuntime(const std::string& ns, const std::string& name, const std::string& uid)>;

// Answers a request for subresource `sub` of VMI NS/NAME. `runtime` may be
// empty (serve --api-only): then console and log answer 400.
HttpResponse HandleVmiSubresource(const HttpRequest& req, state::ObjectStore* store, const VmiRuntimeFn& runtime,
                                  const std::string& ns, const std::string& name, const std::string& sub);

}  // namespace regdisk::api
