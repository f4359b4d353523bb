// KubeApi: the Kubernetes-shaped API over the object store, as kubectl
// drives it. One function turns an HTTP request into a response; the
// transport (api/http_server.h) and the store (state/object_store.h) are
// the only things it talks to.
//
//   KubeApi api({.store = store.get(), .token = creds.token});
//   HttpResponse r = api.Handle(request);
//
// Served (see docs/architecture.md, "The API server"):
//   discovery  /api /api/v1 /apis /apis/kubevirt.io[/v1|/v1alpha1] /version
//              /healthz /readyz /livez /openapi/v2 /openapi/v3[/...]
//   metrics    /metrics (Prometheus text, authenticated like the API)
//   resources  api/resources.h: GET, LIST (labelSelector, fieldSelector),
//              watch=true (one WatchEvent per line), POST, PUT, PATCH
//              (merge, JSON and strategic merge patch, the last as a merge
//              patch as for custom resources), DELETE (finalizers and
//              propagationPolicy Background, Foreground or Orphan, as
//              state::ObjectStore::Delete applies them), DELETE of a collection;
//              /status; /scale (autoscaling/v1 Scale) for replica sets;
//              Table output when the Accept header asks for it.
//   subresources.kubevirt.io/v1: a VMI's console, log and ports
//              (api/subresources.h).
//   errors     metav1.Status with the HTTP code (api/errors.h).
// Requests on the TLS endpoint need `Authorization: Bearer TOKEN` or,
// when accept_client_cert is set, a client certificate the transport
// verified (401 otherwise; the health checks excepted); unix-socket peers
// were checked by the transport.
//
// Thread safety: Handle may be called from many threads at once.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "api/http_server.h"
#include "api/subresources.h"
#include "state/object_store.h"

namespace regdisk::api {

class KubeApi {
 public:
  struct Options {
    state::ObjectStore* store = nullptr;
    std::string token;  // the TLS endpoint's bearer token; "" accepts none
    bool accept_client_cert = false;  // HttpRequest::client_cert_verified authenticates
    // Unix seconds, for Age columns; the system clock when unset.
    std::function<int64_t()> now;
    // A watch without timeoutSeconds ends after this long (the client
    // watches again), as the API server's minRequestTimeout does.
    int64_t default_watch_seconds = 1800;
    // GET /metrics: Prometheus text from the daemon; 404 when unset.
    std::function<std::string()> metrics;
    // Where a VMI's console and log are (api/subresources.h); unset: the
    // console and log subresources answer 400.
    VmiRuntimeFn vmi_runtime;
  };

  explicit KubeApi(Options options);
  HttpResponse Handle(const HttpRequest& req) const;

  // Creates the "default" namespace when missing.
  static Status EnsureDefaultNamespace(state::ObjectStore* store);

 private:
  Options options_;
};

}  // namespace regdisk::api
