#include "api/kube_api.h"

#include <poll.h>

#include <chrono>
#include <map>
#include <optional>
#include <set>
#include <vector>

#include "api/credentials.h"
#include "api/errors.h"
#include "api/openapi.h"
#include "api/resources.h"
#include "api/subresources.h"
#include "api/table.h"
#include "api/validate.h"
#include "registry/http.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::api {

using json = nlohmann::json;

namespace {

int64_t SystemNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// JSON text; bytes that are not UTF-8 (a URL may carry them into a
// message) become U+FFFD instead of an exception.
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

HttpResponse Reply(int code, const json& body) { return HttpResponse::Json(code, Dump(body)); }
HttpResponse Reply(const ApiError& e) { return Reply(e.code, e.ToJson()); }

ApiError PathNotFound() {
  return {404, "NotFound", "the server could not find the requested resource", json::object()};
}

std::vector<std::string> Split(const std::string& path) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string::npos) j = path.size();
    if (j > i) out.push_back(path.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

// What a resource path names.
struct Target {
  const Resource* r = nullptr;
  std::string ns;  // the store namespace ("" for cluster-scoped)
  bool all_namespaces = false;
  std::string name;
  std::string sub;  // "", "status" or "scale"
};

bool IsWatch(const HttpRequest& req) {
  std::string w = req.Query("watch");
  return w == "true" || w == "1";
}

// "application/json; charset=utf-8" -> "application/json".
std::string MediaType(const std::string& content_type) {
  std::string t = content_type.substr(0, content_type.find(';'));
  while (!t.empty() && t.back() == ' ') t.pop_back();
  return t;
}

// Deeper nesting is refused, so that no later recursive walk of a body
// (dump, patch, validation) can exhaust the stack; KubeVirt's objects nest
// about 15 levels.
constexpr int kMaxBodyDepth = 100;

Result<json> ParseBody(const HttpRequest& req) {
  bool too_deep = false;
  json::parser_callback_t check = [&too_deep](int depth, json::parse_event_t, json&) {
    if (depth > kMaxBodyDepth) too_deep = true;
    return !too_deep;
  };
  json body = json::parse(req.body, check, false);
  if (too_deep) return InvalidArgument("the request body nests deeper than " + std::to_string(kMaxBodyDepth) + " levels");
  if (body.is_discarded()) return InvalidArgument("the request body is not valid JSON");
  return body;
}

// Keys of a strategic merge patch that direct the merge ("$patch",
// "$setElementOrder/..."); a merge patch would store them.
void DropDirectives(json* j) {
  if (j->is_object()) {
    for (auto it = j->begin(); it != j->end();) {
      if (!it.key().empty() && it.key()[0] == '$') {
        it = j->erase(it);
      } else {
        DropDirectives(&it.value());
        ++it;
      }
    }
  } else if (j->is_array()) {
    for (auto& e : *j) DropDirectives(&e);
  }
}

std::string SelectorString(const json& object) {
  const json* sel = nullptr;
  if (object.contains("spec") && object["spec"].is_object() && object["spec"].contains("selector")) {
    sel = &object["spec"]["selector"];
  }
  if (!sel || !sel->is_object() || !sel->contains("matchLabels") || !(*sel)["matchLabels"].is_object()) return "";
  std::map<std::string, std::string> labels;
  for (const auto& [k, v] : (*sel)["matchLabels"].items()) {
    if (v.is_string()) labels[k] = v.get<std::string>();
  }
  std::string out;
  for (const auto& [k, v] : labels) out += (out.empty() ? "" : ",") + k + "=" + v;
  return out;
}

json ScaleOf(const json& object) {
  const json& meta = object["metadata"];
  json scale_meta = {{"name", meta.value("name", "")}};
  for (const char* k : {"namespace", "uid", "resourceVersion", "creationTimestamp"}) {
    if (meta.contains(k)) scale_meta[k] = meta[k];
  }
  int64_t desired = 1;
  if (object.contains("spec") && object["spec"].is_object() && object["spec"].contains("replicas") &&
      object["spec"]["replicas"].is_number_integer()) {
    desired = object["spec"]["replicas"].get<int64_t>();
  }
  int64_t current = 0;
  if (object.contains("status") && object["status"].is_object() && object["status"].contains("replicas") &&
      object["status"]["replicas"].is_number_integer()) {
    current = object["status"]["replicas"].get<int64_t>();
  }
  return {{"kind", "Scale"},
          {"apiVersion", "autoscaling/v1"},
          {"metadata", scale_meta},
          {"spec", {{"replicas", desired}}},
          {"status", {{"replicas", current}, {"selector", SelectorString(object)}}}};
}

// Converts a Secret's stringData into data, as the API server does.
void NormalizeSecret(json* object) {
  if (!object->contains("stringData") || !(*object)["stringData"].is_object()) return;
  json& data = (*object)["data"];
  if (!data.is_object()) data = json::object();
  for (const auto& [k, v] : (*object)["stringData"].items()) {
    if (v.is_string()) data[k] = registry::Base64Encode(v.get<std::string>());
  }
  object->erase("stringData");
}

// A write the store refused: a malformed name or label is 422 Invalid, as
// from the API server's validation; the rest as ApiError::FromStatus.
ApiError WriteError(const Status& st, const Resource& r, const std::string& name) {
  if (st.code() != Code::kInvalidArgument) return ApiError::FromStatus(st, r, name);
  std::string what = r.group.empty() ? r.kind : r.kind + "." + r.group;
  // "FIELD: Forbidden: ..." (a finalizer added to an object being deleted).
  if (size_t at = st.message().find(": Forbidden: "); at != std::string::npos &&
                                                     st.message().find(' ') > at) {
    const std::string field = st.message().substr(0, at);
    return {422, "Invalid", what + " \"" + name + "\" is invalid: " + st.message(),
            {{"name", name}, {"group", r.group}, {"kind", r.kind},
             {"causes", {{{"reason", "FieldValueForbidden"}, {"message", st.message().substr(at + 2)}, {"field", field}}}}}};
  }
  return {422, "Invalid", what + " \"" + name + "\" is invalid: " + st.message(),
          {{"name", name}, {"group", r.group}, {"kind", r.kind},
           {"causes", {{{"reason", "FieldValueInvalid"}, {"message", st.message()}, {"field", "metadata"}}}}}};
}

// One line of a watch stream.
std::string EventLine(const std::string& type, const json& object) {
  return Dump(json({{"type", type}, {"object", object}})) + "\n";
}

// The fieldSelector query parameter, split: metadata.name and
// metadata.namespace requirements go to the store (state/selector.h);
// status.phase (VirtualMachineInstances only, as a Pod's is) is matched
// here. Any other field is Kubernetes' 400 "field label not supported".
struct FieldFilter {
  std::string store;  // for state::ListOptions::field_selector
  struct Phase {
    bool equals;
    std::string value;
  };
  std::vector<Phase> phases;

  bool Matches(const json& o) const {
    std::string phase;
    if (o.contains("status") && o["status"].is_object() && o["status"].contains("phase") &&
        o["status"]["phase"].is_string()) {
      phase = o["status"]["phase"].get<std::string>();
    }
    for (const Phase& p : phases) {
      if ((phase == p.value) != p.equals) return false;
    }
    return true;
  }
};

std::string Trim(std::string s) {
  const char* ws = " \t";
  s.erase(0, s.find_first_not_of(ws));
  s.erase(s.find_last_not_of(ws) + 1);
  return s;
}

std::optional<ApiError> ParseFieldFilter(const std::string& text, const Resource& r, FieldFilter* out) {
  size_t start = 0;
  while (start <= text.size() && !Trim(text).empty()) {
    size_t comma = text.find(',', start);
    const std::string part = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    const size_t op = part.find_first_of("!=");
    const std::string field = Trim(part.substr(0, op));
    // A part without an operator: the store's parser words that error.
    if (op == std::string::npos || field == "metadata.name" || field == "metadata.namespace") {
      out->store += (out->store.empty() ? "" : ",") + part;
    } else if (field == "status.phase" && r.kind == "VirtualMachineInstance") {
      std::string rest = part.substr(op);
      FieldFilter::Phase p{true, ""};
      if (rest.rfind("!=", 0) == 0) {
        p.equals = false;
        rest.erase(0, 2);
      } else if (rest.rfind("==", 0) == 0) {
        rest.erase(0, 2);
      } else if (rest.rfind("=", 0) == 0) {
        rest.erase(0, 1);
      } else {
        rest = "!";  // a lone '!': refused below
      }
      p.value = Trim(rest);
      // "status.phase!Running" or "status.phase!==X" is no selector (read
      // loosely, the first would be its opposite).
      if (p.value.find_first_of("!=") != std::string::npos) {
        return ApiError::BadRequest("invalid field selector: " + part + " (use FIELD=VALUE, FIELD==VALUE or FIELD!=VALUE)");
      }
      out->phases.push_back(std::move(p));
    } else {
      return ApiError::BadRequest("field label not supported: " + field);
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return std::nullopt;
}

// A watch's events as chunks, until the client hangs up, the server stops,
// the timeout passes or the subscription ends.
class WatchStream : public HttpStream {
 public:
  // `filter` (status.phase) is matched here; `matching` names the objects
  // that matched it when the watch began ("ns/name").
  WatchStream(std::unique_ptr<state::Subscription> sub, const HttpRequest& req, std::function<json(const json&)> shape,
              int64_t timeout_seconds, FieldFilter filter = {}, std::set<std::string> matching = {})
      : sub_(std::move(sub)),
        stop_(req.stop),
        fd_(req.fd),
        shape_(std::move(shape)),
        deadline_(std::chrono::steady_clock::now() + std::chrono::seconds(timeout_seconds)),
        filter_(std::move(filter)),
        matching_(std::move(matching)) {}

  Result<std::string> Next() override {
    if (done_) return std::string();
    while (true) {
      Result<std::optional<state::WatchEvent>> ev = sub_->TryNext();
      if (!ev.ok()) {
        done_ = true;
        if (ev.status().code() == Code::kResourceExhausted) {
          return EventLine("ERROR", ApiError::Expired("the watch fell behind; list and watch again").ToJson());
        }
        return std::string();
      }
      if (ev->has_value()) {
        const state::WatchEvent& e = **ev;
        std::string type(state::EventTypeName(e.type));
        if (!filter_.phases.empty() && !Filter(e.object, &type)) continue;
        return EventLine(type, shape_(e.object));
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::string();
      pollfd fds[3] = {{sub_->poll_fd(), POLLIN, 0},
                       {stop_ ? stop_->poll_fd() : -1, POLLIN, 0},
                       {fd_, POLLRDHUP, 0}};
      int n = poll(fds, 3, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
      if (n < 0 && errno != EINTR) return ErrnoStatus("poll");
      if ((stop_ && stop_->cancelled()) || (fds[1].revents & POLLIN)) return std::string();
      if (fds[2].revents & (POLLRDHUP | POLLHUP | POLLERR)) return Cancelled("the client hung up");
    }
  }

 private:
  std::unique_ptr<state::Subscription> sub_;
  const CancelToken* stop_;
  int fd_;
  std::function<json(const json&)> shape_;
  std::chrono::steady_clock::time_point deadline_;
  bool done_ = false;
  FieldFilter filter_;
  std::set<std::string> matching_;

  // As the API server's watch cache does for a field selector: an object
  // that starts matching is ADDED, one that stops matching is DELETED,
  // others' events are dropped. False: drop the event.
  bool Filter(const json& o, std::string* type) {
    const json& meta = o["metadata"];
    const std::string key = meta.value("namespace", "") + "/" + meta.value("name", "");
    const bool was = matching_.count(key) > 0;
    const bool is = *type != "DELETED" && filter_.Matches(o);
    if (is) {
      matching_.insert(key);
      if (!was) *type = "ADDED";
      return true;
    }
    matching_.erase(key);
    if (!was) return false;
    *type = "DELETED";
    return true;
  }
};

// A stream of one ERROR event (a watch that cannot start).
class ErrorStream : public HttpStream {
 public:
  explicit ErrorStream(json status) : line_(EventLine("ERROR", status)) {}
  Result<std::string> Next() override { return std::exchange(line_, std::string()); }

 private:
  std::string line_;
};

class RequestHandler {
 public:
  RequestHandler(const KubeApi::Options& o, const HttpRequest& req) : o_(o), req_(req) {}
  HttpResponse Handle();

 private:
  HttpResponse Discovery(const std::vector<std::string>& segs);
  HttpResponse Resource(const Target& t);
  HttpResponse Get(const Target& t);
  HttpResponse List(const Target& t);
  HttpResponse Watch(const Target& t);
  HttpResponse Create(const Target& t);
  HttpResponse CreateObject(const Target& t, json object);
  HttpResponse Update(const Target& t);
  HttpResponse Patch(const Target& t);
  HttpResponse Delete(const Target& t);
  HttpResponse DeleteCollection(const Target& t);

  // Fills apiVersion, kind and metadata.namespace, checks them and the
  // name; then field validation and KubeVirt's rules. On success the
  // object is ready to store; warnings go to response headers.
  std::optional<ApiError> Prepare(const Target& t, json* object, bool create);
  Result<json> StoreUpdate(const Target& t, const json& object);
  Result<state::Propagation> PropagationOf(const json& options) const;
  void DeleteNamespaceContents(const std::string& ns);
  HttpResponse Output(int code, const Target& t, const json& object);
  int64_t Now() const { return o_.now ? o_.now() : SystemNow(); }
  bool DryRun() const { return req_.Query("dryRun") == "All"; }

  const KubeApi::Options& o_;
  const HttpRequest& req_;
  std::vector<std::string> warnings_;
};

HttpResponse RequestHandler::Handle() {
  const std::string& path = req_.path;
  if (path == "/healthz" || path == "/readyz" || path == "/livez") {
    HttpResponse r;
    r.content_type = "text/plain; charset=utf-8";
    r.body = "ok";
    return r;
  }
  if (req_.tls && !(o_.accept_client_cert && req_.client_cert_verified) &&
      !BearerMatches(req_.Header("authorization"), o_.token)) {
    return Reply(ApiError::Unauthorized());
  }
  if (path == "/metrics" && o_.metrics) {
    HttpResponse r;
    r.content_type = "text/plain; version=0.0.4; charset=utf-8";
    r.body = o_.metrics();
    return r;
  }
  std::vector<std::string> segs = Split(path);
  if (segs.empty()) return Reply(PathNotFound());
  if (segs[0] == "version" && segs.size() == 1) {
    return Reply(200, {{"major", "1"},
                       {"minor", "32"},
                       {"gitVersion", "v1.32.0"},
                       {"gitCommit", ""},
                       {"gitTreeState", "clean"},
                       {"buildDate", "2026-01-01T00:00:00Z"},
                       {"goVersion", "regdisk"},
                       {"compiler", "regdisk"},
                       {"platform", "linux/amd64"}});
  }
  if (segs[0] == "openapi") {
    if (req_.method != "GET") return Reply(ApiError::MethodNotAllowed("the OpenAPI documents are read-only"));
    std::optional<json> doc = OpenApiDocument(segs, req_.Header("accept"));
    if (!doc) return Reply(PathNotFound());
    return Reply(200, *doc);
  }
  if (segs[0] != "api" && segs[0] != "apis") return Reply(PathNotFound());
  size_t base = segs[0] == "api" ? 2 : 3;
  if (segs.size() <= base) return Discovery(segs);
  Target t;
  std::string group = segs[0] == "api" ? "" : segs[1];
  std::string version = segs[base - 1];
  std::vector<std::string> rest(segs.begin() + static_cast<long>(base), segs.end());
  std::string plural;
  if (rest[0] == "namespaces" && rest.size() >= 3) {
    t.ns = rest[1];
    plural = rest[2];
    rest.erase(rest.begin(), rest.begin() + 3);
  } else {
    plural = rest[0];
    rest.erase(rest.begin());
    t.all_namespaces = true;
  }
  if (group == kSubresourceGroup) {
    if (version != "v1" || t.all_namespaces || plural != "virtualmachineinstances" || rest.size() != 2) {
      return Reply(PathNotFound());
    }
    return HandleVmiSubresource(req_, o_.store, o_.vmi_runtime, t.ns, rest[0], rest[1]);
  }
  if (rest.size() > 2) return Reply(PathNotFound());
  if (!rest.empty()) t.name = rest[0];
  if (rest.size() == 2) t.sub = rest[1];
  t.r = FindResource(group, version, plural);
  if (!t.r) return Reply(PathNotFound());
  if (!t.r->namespaced) {
    if (!t.ns.empty()) return Reply(PathNotFound());
    t.all_namespaces = false;
  } else if (t.all_namespaces && !t.name.empty()) {
    return Reply(PathNotFound());
  }
  if (!t.sub.empty() && !((t.sub == "status" && t.r->has_status) || (t.sub == "scale" && t.r->has_scale))) {
    return Reply(PathNotFound());
  }
  HttpResponse resp = Resource(t);
  for (const auto& w : warnings_) {
    resp.headers.emplace_back("Warning", "299 - " + Dump(json(w)));
  }
  return resp;
}

HttpResponse RequestHandler::Discovery(const std::vector<std::string>& segs) {
  if (req_.method != "GET") return Reply(ApiError::MethodNotAllowed("discovery is read-only"));
  if (segs[0] == "api") return segs.size() == 1 ? Reply(200, CoreVersions()) : [&] {
    json list = ResourceList(segs[1]);
    return list.is_null() ? Reply(PathNotFound()) : Reply(200, list);
  }();
  if (segs.size() == 1) return Reply(200, GroupList());
  if (segs.size() == 2) {
    const json groups = GroupList();
    for (const auto& g : groups["groups"]) {
      if (g["name"] == segs[1]) {
        json group = g;
        group["kind"] = "APIGroup";
        group["apiVersion"] = "v1";
        return Reply(200, group);
      }
    }
    return Reply(PathNotFound());
  }
  json list = ResourceList(segs[1] + "/" + segs[2]);
  return list.is_null() ? Reply(PathNotFound()) : Reply(200, list);
}

HttpResponse RequestHandler::Resource(const Target& t) {
  const std::string& m = req_.method;
  if (t.name.empty()) {
    if (m == "GET") return IsWatch(req_) ? Watch(t) : List(t);
    if (m == "POST" && !t.all_namespaces) return Create(t);
    if (m == "POST" && !t.r->namespaced) return Create(t);
    if (m == "DELETE") return DeleteCollection(t);
  } else {
    if (m == "GET") return Get(t);
    if (m == "PUT") return Update(t);
    if (m == "PATCH") return Patch(t);
    if (m == "DELETE" && t.sub.empty()) return Delete(t);
  }
  return Reply(ApiError::MethodNotAllowed("the server does not allow this method on the requested resource"));
}

HttpResponse RequestHandler::Output(int code, const Target& t, const json& object) {
  if (t.sub == "scale") return Reply(code, ScaleOf(object));
  if (req_.method == "GET" && WantsTable(req_.Header("accept"))) {
    std::string rv = object["metadata"].value("resourceVersion", "");
    return Reply(code, ToTable(*t.r, {object}, rv, Now()));
  }
  return Reply(code, object);
}

HttpResponse RequestHandler::Get(const Target& t) {
  Result<json> obj = o_.store->Get(t.r->store_key, t.ns, t.name);
  if (!obj.ok()) return Reply(ApiError::FromStatus(obj.status(), *t.r, t.name));
  return Output(200, t, *obj);
}

HttpResponse RequestHandler::List(const Target& t) {
  FieldFilter fields;
  if (auto bad = ParseFieldFilter(req_.Query("fieldSelector"), *t.r, &fields)) return Reply(*bad);
  state::ListOptions lo{req_.Query("labelSelector"), fields.store};
  Result<state::ObjectList> list = o_.store->List(t.r->store_key, t.ns, lo, t.all_namespaces);
  if (!list.ok()) return Reply(ApiError::FromStatus(list.status(), *t.r, ""));
  std::erase_if(list->items, [&fields](const json& o) { return !fields.Matches(o); });
  const std::string rv = std::to_string(list->resource_version);
  if (WantsTable(req_.Header("accept"))) return Reply(200, ToTable(*t.r, list->items, rv, Now()));
  return Reply(200, {{"kind", t.r->kind + "List"},
                     {"apiVersion", t.r->api_version()},
                     {"metadata", {{"resourceVersion", rv}}},
                     {"items", list->items}});
}

HttpResponse RequestHandler::Watch(const Target& t) {
  Result<int64_t> from = state::ParseResourceVersion(req_.Query("resourceVersion"));
  if (!from.ok()) return Reply(ApiError::BadRequest(from.status().message()));
  int64_t timeout = o_.default_watch_seconds;
  if (std::string ts = req_.Query("timeoutSeconds"); !ts.empty()) {
    char* end = nullptr;
    long long v = std::strtoll(ts.c_str(), &end, 10);
    if (*end != '\0' || v < 0) return Reply(ApiError::BadRequest("timeoutSeconds must be a whole number of seconds"));
    if (v > 0) timeout = v;
  }
  FieldFilter fields;
  if (auto bad = ParseFieldFilter(req_.Query("fieldSelector"), *t.r, &fields)) return Reply(*bad);
  state::ListOptions lo{req_.Query("labelSelector"), fields.store};
  // Which objects match the phase filter now, so that the first event of
  // one that stops matching is a DELETED.
  std::set<std::string> matching;
  if (!fields.phases.empty()) {
    Result<state::ObjectList> now = o_.store->List(t.r->store_key, t.ns, lo, t.all_namespaces);
    if (!now.ok()) return Reply(ApiError::FromStatus(now.status(), *t.r, ""));
    for (const json& o : now->items) {
      if (fields.Matches(o)) matching.insert(o["metadata"].value("namespace", "") + "/" + o["metadata"].value("name", ""));
    }
  }
  Result<std::unique_ptr<state::Subscription>> sub =
      o_.store->Watch(t.r->store_key, t.ns, lo, *from, t.all_namespaces);
  HttpResponse resp;
  if (!sub.ok()) {
    if (sub.status().code() != Code::kOutOfRange) return Reply(ApiError::FromStatus(sub.status(), *t.r, ""));
    resp.stream = std::make_unique<ErrorStream>(
        ApiError::Expired("too old resource version: " + req_.Query("resourceVersion")).ToJson());
    return resp;
  }
  std::function<json(const json&)> shape = [](const json& o) { return o; };
  if (WantsTable(req_.Header("accept"))) {
    const api::Resource* r = t.r;
    auto now = o_.now;
    shape = [r, now](const json& o) {
      std::string rv = o["metadata"].value("resourceVersion", "");
      return ToTable(*r, {o}, rv, now ? now() : SystemNow());
    };
  }
  resp.stream = std::make_unique<WatchStream>(std::move(*sub), req_, std::move(shape), timeout, std::move(fields),
                                             std::move(matching));
  return resp;
}

std::optional<ApiError> RequestHandler::Prepare(const Target& t, json* object, bool create) {
  if (!object->is_object()) return ApiError::BadRequest("the request body is not a JSON object");
  json& o = *object;
  const std::string want_version = t.r->api_version();
  if (!o.contains("apiVersion")) o["apiVersion"] = want_version;
  if (!o.contains("kind")) o["kind"] = t.r->kind;
  if (o["apiVersion"] != want_version) {
    return ApiError::BadRequest("the API version in the data (" + Dump(o["apiVersion"]) +
                                ") does not match the expected API version (" + want_version + ")");
  }
  if (o["kind"] != t.r->kind) {
    return ApiError::BadRequest("the kind in the data (" + Dump(o["kind"]) + ") does not match the expected kind (" +
                                t.r->kind + ")");
  }
  if (!o.contains("metadata") || !o["metadata"].is_object()) o["metadata"] = json::object();
  json& meta = o["metadata"];
  if (t.r->namespaced) {
    if (meta.contains("namespace") && meta["namespace"] != t.ns) {
      return ApiError::BadRequest("the namespace of the provided object does not match the namespace sent on the request");
    }
    meta["namespace"] = t.ns;
  } else {
    meta.erase("namespace");
  }
  if (create && (!meta.contains("name") || meta["name"] == "") && meta.contains("generateName") &&
      meta["generateName"].is_string()) {
    Result<std::string> uid = state::NewUuid();
    if (!uid.ok()) return ApiError::FromStatus(uid.status(), *t.r, "");
    meta["name"] = meta["generateName"].get<std::string>() + uid->substr(0, 5);
  }
  if (!meta.contains("name") || !meta["name"].is_string() || meta["name"] == "") {
    return ApiError{422, "Invalid", t.r->kind + " \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    {{"kind", t.r->kind}, {"group", t.r->group},
                     {"causes", {{{"reason", "FieldValueRequired"}, {"message", "Required value: name or generateName is required"}, {"field", "metadata.name"}}}}}};
  }
  if (!create && meta["name"] != t.name) {
    return ApiError::BadRequest("the name of the object (" + Dump(meta["name"]) +
                                ") does not match the name on the URL (" + t.name + ")");
  }
  // A status write keeps the stored spec (ObjectStore::UpdateStatus):
  // nothing else of the body is stored, so nothing else is checked.
  if (t.sub == "status") return std::nullopt;
  if (create && t.r->has_status) o.erase("status");
  if (t.r->kind == "Secret") NormalizeSecret(&o);
  Result<FieldValidation> fv = ParseFieldValidation(req_.Query("fieldValidation"));
  if (!fv.ok()) return ApiError::BadRequest(fv.status().message());
  Validation v = ValidateObject(*t.r, &o);
  const std::string name = meta["name"].get<std::string>();
  if (!v.unknown_fields.empty() && *fv == FieldValidation::kStrict) {
    std::string msg = t.r->kind + " in version \"" + t.r->version + "\" cannot be handled as a " + t.r->kind +
                      ": strict decoding error: ";
    for (size_t i = 0; i < v.unknown_fields.size(); ++i) {
      msg += (i ? ", " : "") + std::string("unknown field \"") + v.unknown_fields[i] + "\"";
    }
    return ApiError::BadRequest(msg);
  }
  if (*fv == FieldValidation::kWarn) {
    for (const auto& f : v.unknown_fields) warnings_.push_back("unknown field \"" + f + "\"");
  }
  for (const auto& w : v.warnings) warnings_.push_back(w);
  if (!v.errors.empty()) {
    json causes = json::array();
    std::string list;
    for (const auto& [field, message] : v.errors) {
      causes.push_back({{"reason", "FieldValueInvalid"}, {"message", message}, {"field", field}});
      list += (list.empty() ? "" : ", ") + (field.empty() ? message : field + ": " + message);
    }
    std::string what = t.r->group.empty() ? t.r->kind : t.r->kind + "." + t.r->group;
    if (v.errors.size() > 1) list = "[" + list + "]";
    return ApiError{422, "Invalid", what + " \"" + name + "\" is invalid: " + list,
                    {{"name", name}, {"group", t.r->group}, {"kind", t.r->kind}, {"causes", causes}}};
  }
  return std::nullopt;
}

HttpResponse RequestHandler::Create(const Target& t) {
  std::string media = MediaType(req_.Header("content-type"));
  if (media != "application/json" && !media.empty()) return Reply(ApiError::UnsupportedMediaType(media));
  Result<json> body = ParseBody(req_);
  if (!body.ok()) return Reply(ApiError::BadRequest(body.status().message()));
  return CreateObject(t, std::move(*body));
}

HttpResponse RequestHandler::CreateObject(const Target& t, json object) {
  if (t.r->namespaced) {
    Result<json> ns = o_.store->Get(kNamespaceKey, "", t.ns);
    if (!ns.ok()) return Reply(ApiError::FromStatus(ns.status(), *FindResource("", "v1", "namespaces"), t.ns));
  }
  if (auto err = Prepare(t, &object, true)) return Reply(*err);
  if (t.r->kind == "Namespace") object["status"] = {{"phase", "Active"}};
  if (DryRun()) return Reply(201, object);
  const std::string name = object["metadata"]["name"].get<std::string>();
  Result<json> created = o_.store->Create(t.r->store_key, std::move(object));
  if (!created.ok()) return Reply(WriteError(created.status(), *t.r, name));
  return Reply(201, *created);
}

Result<json> RequestHandler::StoreUpdate(const Target& t, const json& object) {
  if (t.sub == "status") return o_.store->UpdateStatus(t.r->store_key, object);
  return o_.store->Update(t.r->store_key, object);
}

// Sets spec.replicas of a replica set from a Scale object.
Result<json> ScaledObject(json object, const json& scale) {
  if (!scale.is_object() || !scale.contains("spec") || !scale["spec"].is_object() ||
      !scale["spec"].contains("replicas") || !scale["spec"]["replicas"].is_number_integer() ||
      scale["spec"]["replicas"].get<int64_t>() < 0) {
    return InvalidArgument("Scale.spec.replicas must be a whole number, 0 or more");
  }
  if (!object["spec"].is_object()) object["spec"] = json::object();
  object["spec"]["replicas"] = scale["spec"]["replicas"];
  if (scale.contains("metadata") && scale["metadata"].is_object() && scale["metadata"].contains("resourceVersion")) {
    object["metadata"]["resourceVersion"] = scale["metadata"]["resourceVersion"];
  }
  return object;
}

HttpResponse RequestHandler::Update(const Target& t) {
  std::string media = MediaType(req_.Header("content-type"));
  if (media != "application/json" && !media.empty()) return Reply(ApiError::UnsupportedMediaType(media));
  Result<json> body = ParseBody(req_);
  if (!body.ok()) return Reply(ApiError::BadRequest(body.status().message()));
  if (t.sub == "scale") {
    Result<json> current = o_.store->Get(t.r->store_key, t.ns, t.name);
    if (!current.ok()) return Reply(ApiError::FromStatus(current.status(), *t.r, t.name));
    Result<json> scaled = ScaledObject(*current, *body);
    if (!scaled.ok()) return Reply(ApiError{422, "Invalid", scaled.status().message()});
    *body = std::move(*scaled);
  }
  if (auto err = Prepare(t, &*body, false)) return Reply(*err);
  // As Kubernetes for custom resources: an update names the version it
  // replaces (a PUT of the original manifest would drop finalizers).
  if (t.sub.empty() && t.r->group == "kubevirt.io" &&
      (!(*body)["metadata"].contains("resourceVersion") || (*body)["metadata"]["resourceVersion"] == "")) {
    const std::string msg = "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update";
    return Reply(ApiError{422, "Invalid", t.r->kind + "." + t.r->group + " \"" + t.name + "\" is invalid: " + msg,
                          {{"name", t.name}, {"group", t.r->group}, {"kind", t.r->kind},
                           {"causes", {{{"reason", "FieldValueInvalid"},
                                        {"message", "Invalid value: 0x0: must be specified for an update"},
                                        {"field", "metadata.resourceVersion"}}}}}});
  }
  if (DryRun()) return Output(200, t, *body);
  Result<json> updated = StoreUpdate(t, *body);
  if (!updated.ok()) return Reply(WriteError(updated.status(), *t.r, t.name));
  return Output(200, t, *updated);
}

HttpResponse RequestHandler::Patch(const Target& t) {
  std::string media = MediaType(req_.Header("content-type"));
  bool json_patch = media == "application/json-patch+json";
  bool strategic = media == "application/strategic-merge-patch+json";
  bool apply = media == "application/apply-patch+yaml";
  if (!json_patch && !strategic && !apply && media != "application/merge-patch+json") {
    return Reply(ApiError::UnsupportedMediaType(media));
  }
  Result<json> patch = ParseBody(req_);
  if (!patch.ok()) {
    return Reply(ApiError::BadRequest(patch.status().message() + (apply ? " (server-side apply takes the object as JSON, "
                                                                          "as kubectl sends it)"
                                                                        : "")));
  }
  if (apply && t.sub.empty()) {
    // Server-side apply, simplified: the applied configuration creates the
    // object or is merged into it (managedFields are not tracked, so a
    // field left out of the configuration is kept, and no conflicts are
    // reported).
    Result<json> current = o_.store->Get(t.r->store_key, t.ns, t.name);
    if (!current.ok() && current.status().code() == Code::kNotFound) {
      if (!patch->is_object()) return Reply(ApiError::BadRequest("an applied configuration is a JSON object"));
      if (!patch->contains("metadata") || !(*patch)["metadata"].is_object()) (*patch)["metadata"] = json::object();
      if ((*patch)["metadata"].value("name", t.name) != t.name) {
        return Reply(ApiError::BadRequest("the name of the object does not match the name on the URL (" + t.name + ")"));
      }
      (*patch)["metadata"]["name"] = t.name;
      return CreateObject(t, std::move(*patch));
    }
  }
  if (strategic) DropDirectives(&*patch);
  if (json_patch ? !patch->is_array() : !patch->is_object()) {
    return Reply(ApiError::BadRequest(json_patch ? "a JSON patch is an array of operations"
                                                 : "a merge patch is a JSON object"));
  }
  // A patch applies to the latest object; a write that loses a race with
  // another is retried on the newer object unless the patch itself named
  // a resourceVersion.
  for (int attempt = 0;; ++attempt) {
    Result<json> current = o_.store->Get(t.r->store_key, t.ns, t.name);
    if (!current.ok()) return Reply(ApiError::FromStatus(current.status(), *t.r, t.name));
    json base = t.sub == "scale" ? ScaleOf(*current) : *current;
    const std::string stored_rv = (*current)["metadata"].value("resourceVersion", "");
    json patched;
    try {
      patched = json_patch ? base.patch(*patch) : base;
      if (!json_patch) patched.merge_patch(*patch);
    } catch (const json::exception& e) {
      return Reply(ApiError{422, "Invalid", std::string("the patch could not be applied: ") + e.what()});
    }
    if (t.sub == "scale") {
      Result<json> scaled = ScaledObject(*current, patched);
      if (!scaled.ok()) return Reply(ApiError{422, "Invalid", scaled.status().message()});
      patched = std::move(*scaled);
    }
    if (!patched.is_object()) return Reply(ApiError::BadRequest("the patched object is not a JSON object"));
    bool pinned = patched.contains("metadata") && patched["metadata"].is_object() &&
                  patched["metadata"].value("resourceVersion", stored_rv) != stored_rv;
    if (auto err = Prepare(t, &patched, false)) return Reply(*err);
    if (DryRun()) return Output(200, t, patched);
    Result<json> updated = StoreUpdate(t, patched);
    if (updated.ok()) return Output(200, t, *updated);
    if (updated.status().code() != Code::kAborted || pinned || attempt >= 4) {
      return Reply(WriteError(updated.status(), *t.r, t.name));
    }
  }
}

// A deleted namespace takes its objects with it (at once: there is no
// Terminating phase).
void RequestHandler::DeleteNamespaceContents(const std::string& ns) {
  for (const auto& r : Resources()) {
    if (!r.namespaced) continue;
    Result<state::ObjectList> list = o_.store->List(r.store_key, ns);
    if (!list.ok()) continue;
    for (const auto& item : list->items) {
      Status st = o_.store->Delete(r.store_key, ns, item["metadata"].value("name", "")).status();
      if (!st.ok() && st.code() != Code::kNotFound) log::Warn("api: emptying namespace {}: {}", Printable(ns), st.ToString());
    }
  }
}

// DeleteOptions.propagationPolicy (the query parameter when the body has
// none), or the deprecated orphanDependents.
Result<state::Propagation> RequestHandler::PropagationOf(const json& options) const {
  std::string policy = req_.Query("propagationPolicy");
  if (options.contains("propagationPolicy") && options["propagationPolicy"].is_string()) {
    policy = options["propagationPolicy"].get<std::string>();
  }
  const json* orphan = options.contains("orphanDependents") ? &options["orphanDependents"] : nullptr;
  if (orphan != nullptr && !orphan->is_boolean()) orphan = nullptr;
  if (orphan != nullptr && !policy.empty()) {
    return InvalidArgument("propagationPolicy: Invalid value: \"" + policy +
                           "\": orphanDependents and deletionPropagation cannot be both set");
  }
  if (orphan != nullptr) return orphan->get<bool>() ? state::Propagation::kOrphan : state::Propagation::kBackground;
  if (policy.empty() || policy == "Background") return state::Propagation::kBackground;
  if (policy == "Foreground") return state::Propagation::kForeground;
  if (policy == "Orphan") return state::Propagation::kOrphan;
  return InvalidArgument("propagationPolicy: Unsupported value: " + json(policy).dump() +
                         ": supported values: \"Foreground\", \"Background\", \"Orphan\"");
}

ApiError DeleteOptionsInvalid(const Status& st) {
  return {422, "Invalid", "DeleteOptions.meta.k8s.io \"\" is invalid: " + st.message(),
          {{"group", "meta.k8s.io"}, {"kind", "DeleteOptions"},
           {"causes", {{{"reason", "FieldValueNotSupported"}, {"message", st.message()}, {"field", "propagationPolicy"}}}}}};
}

HttpResponse RequestHandler::Delete(const Target& t) {
  json options = json::object();
  if (!req_.body.empty()) {
    Result<json> body = ParseBody(req_);
    if (!body.ok() || !body->is_object()) return Reply(ApiError::BadRequest("the DeleteOptions are not a JSON object"));
    options = std::move(*body);
  }
  state::Preconditions pre;
  if (options.contains("preconditions") && options["preconditions"].is_object()) {
    const json& p = options["preconditions"];
    if (p.contains("uid") && p["uid"].is_string()) pre.uid = p["uid"].get<std::string>();
    if (p.contains("resourceVersion") && p["resourceVersion"].is_string()) {
      Result<int64_t> rv = state::ParseResourceVersion(p["resourceVersion"].get<std::string>());
      if (!rv.ok()) return Reply(ApiError::BadRequest(rv.status().message()));
      pre.resource_version = *rv;
    }
  }
  bool dry_run = DryRun() || (options.contains("dryRun") && options["dryRun"].is_array() &&
                              options["dryRun"].size() == 1 && options["dryRun"][0] == "All");
  if (dry_run) return Get(t);
  if (t.r->kind == "Namespace" && t.name == "default") {
    return Reply(ApiError{403, "Forbidden", "namespace \"default\" is kept: regdisk does not delete it"});
  }
  Result<state::Propagation> propagation = PropagationOf(options);
  if (!propagation.ok()) return Reply(DeleteOptionsInvalid(propagation.status()));
  Result<json> deleted = o_.store->Delete(t.r->store_key, t.ns, t.name, pre, *propagation);
  if (!deleted.ok()) return Reply(ApiError::FromStatus(deleted.status(), *t.r, t.name));
  if (t.r->kind == "Namespace") DeleteNamespaceContents(t.name);
  return Reply(200, *deleted);
}

HttpResponse RequestHandler::DeleteCollection(const Target& t) {
  FieldFilter fields;
  if (auto bad = ParseFieldFilter(req_.Query("fieldSelector"), *t.r, &fields)) return Reply(*bad);
  state::ListOptions lo{req_.Query("labelSelector"), fields.store};
  Result<state::ObjectList> list = o_.store->List(t.r->store_key, t.ns, lo, t.all_namespaces);
  if (!list.ok()) return Reply(ApiError::FromStatus(list.status(), *t.r, ""));
  std::erase_if(list->items, [&fields](const json& o) { return !fields.Matches(o); });
  json options = json::object();
  if (!req_.body.empty()) {
    Result<json> body = ParseBody(req_);
    if (!body.ok() || !body->is_object()) return Reply(ApiError::BadRequest("the DeleteOptions are not a JSON object"));
    options = std::move(*body);
  }
  Result<state::Propagation> prop = PropagationOf(options);
  if (!prop.ok()) return Reply(DeleteOptionsInvalid(prop.status()));
  const state::Propagation propagation = *prop;
  json items = json::array();
  for (const auto& item : list->items) {
    const std::string name = item["metadata"].value("name", "");
    const std::string ns = item["metadata"].value("namespace", "");
    if (t.r->kind == "Namespace" && name == "default") continue;
    if (DryRun()) {
      items.push_back(item);
      continue;
    }
    Result<json> deleted = o_.store->Delete(t.r->store_key, ns, name, {}, propagation);
    if (!deleted.ok()) continue;  // deleted meanwhile
    items.push_back(*deleted);
  }
  return Reply(200, {{"kind", t.r->kind + "List"},
                     {"apiVersion", t.r->api_version()},
                     {"metadata", {{"resourceVersion", std::to_string(list->resource_version)}}},
                     {"items", items}});
}

}  // namespace

KubeApi::KubeApi(Options options) : options_(std::move(options)) {}

HttpResponse KubeApi::Handle(const HttpRequest& req) const {
  RequestHandler h(options_, req);
  return h.Handle();
}

Status KubeApi::EnsureDefaultNamespace(state::ObjectStore* store) {
  Result<json> got = store->Get(kNamespaceKey, "", "default");
  if (got.ok()) return OkStatus();
  if (got.status().code() != Code::kNotFound) return got.status();
  json ns = {{"apiVersion", "v1"},
             {"kind", "Namespace"},
             {"metadata", {{"name", "default"}}},
             {"spec", {{"finalizers", {"kubernetes"}}}},
             {"status", {{"phase", "Active"}}}};
  Result<json> created = store->Create(kNamespaceKey, ns);
  if (!created.ok() && created.status().code() != Code::kAlreadyExists) return created.status();
  return OkStatus();
}

}  // namespace regdisk::api
