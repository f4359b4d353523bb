// libFuzzer target for the API server's request path (api/kube_api.h): any
// request must get an HTTP status from the set the API answers with,
// without crashing, hanging or tripping ASan. The input is
//   METHOD PATH[?QUERY]\n CONTENT-TYPE\n ACCEPT\n BODY
// against one object store in a temp directory, kept across inputs so that
// later requests meet objects earlier ones created.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <string_view>

#include "api/kube_api.h"
#include "state/object_store.h"

namespace {

using regdisk::api::HttpRequest;
using regdisk::api::KubeApi;

struct Fixture {
  std::filesystem::path dir;
  std::unique_ptr<regdisk::state::ObjectStore> store;
  std::unique_ptr<KubeApi> api;
  regdisk::CancelToken stop;
  Fixture() {
    char tmpl[] = "/tmp/regdisk-api-fuzz-XXXXXX";
    if (!mkdtemp(tmpl)) std::abort();
    dir = tmpl;
    regdisk::state::ObjectStore::Options o;
    o.event_max_count = 64;
    o.sync_every_commit = false;
    o.now = [] { return int64_t{1800000000}; };
    store = regdisk::state::ObjectStore::Open(dir / "state.db", o).value();
    if (!KubeApi::EnsureDefaultNamespace(store.get()).ok()) std::abort();
    KubeApi::Options ao;
    ao.store = store.get();
    ao.now = [] { return int64_t{1800000100}; };
    api = std::make_unique<KubeApi>(ao);
    stop.Cancel("fuzzing: watches return what is queued, then end");
  }
  ~Fixture() {
    api.reset();
    store.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

std::string_view Line(std::string_view* text) {
  size_t nl = text->find('\n');
  std::string_view line = text->substr(0, nl);
  text->remove_prefix(nl == std::string_view::npos ? text->size() : nl + 1);
  return line;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture f;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  std::string_view first = Line(&text);
  HttpRequest req;
  size_t space = first.find(' ');
  req.method = std::string(first.substr(0, space));
  std::string_view target = space == std::string_view::npos ? "" : first.substr(space + 1);
  size_t q = target.find('?');
  req.path = std::string(target.substr(0, q));
  if (q != std::string_view::npos) {
    std::string_view query = target.substr(q + 1);
    while (!query.empty()) {
      size_t amp = query.find('&');
      std::string_view arg = query.substr(0, amp);
      size_t eq = arg.find('=');
      req.query.emplace(std::string(arg.substr(0, eq)), eq == std::string_view::npos ? "" : std::string(arg.substr(eq + 1)));
      query.remove_prefix(amp == std::string_view::npos ? query.size() : amp + 1);
    }
  }
  req.headers["content-type"] = std::string(Line(&text));
  req.headers["accept"] = std::string(Line(&text));
  req.body = std::string(text);
  req.stop = &f.stop;
  regdisk::api::HttpResponse resp = f.api->Handle(req);
  static const std::set<int> kCodes = {200, 201, 400, 403, 404, 405, 409, 410, 413, 415, 422, 500};
  if (!kCodes.count(resp.status)) std::abort();
  if (resp.status == 500) std::abort();  // every failure the API expects has its own code
  if (resp.stream) {
    for (int i = 0; i < 100; ++i) {
      auto chunk = resp.stream->Next();
      if (!chunk.ok() || chunk->empty()) break;
    }
  }
  return 0;
}
