// The node daemon's API (src/api): the real `regdisk serve` in a temp root,
// driven by the real kubectl (v1.32) through the kubeconfig it writes, and
// by libcurl over the unix socket and the TLS endpoint; then the request
// handler in-process, for what a real server makes slow to reach (410 Gone
// after pruned events, Table cells of a VMI with status).
//
// Nothing here needs QEMU: the API only stores objects; no controller runs.
#include <curl/curl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <fcntl.h>
#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <regex>
#include <sstream>
#include <atomic>
#include <functional>
#include <map>
#include <filesystem>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "api/credentials.h"
#include "api/kube_api.h"
#include "api/resources.h"
#include "api/table.h"
#include "harness/harness.h"
#include "state/object_store.h"

namespace regdisk::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;

const char kKubectl[] = "/usr/bin/kubectl";

struct HttpResult {
  long code = 0;
  std::string body;
  std::string headers;
  CURLcode curl = CURLE_OK;
  json Json() const { return json::parse(body, nullptr, false); }
};

size_t Append(char* p, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(p, size * n);
  return size * n;
}

struct CallOptions {
  std::string method = "GET";
  std::string path;
  std::string body;
  std::string content_type = "application/json";
  std::string accept;
  std::string unix_socket;  // or:
  std::string https_base;   // "https://127.0.0.1:PORT"
  std::string ca_file;
  std::string token;
  std::string cert_file, key_file;  // a client certificate (PEM)
  bool chunked = false;     // send the body without Content-Length
  long timeout_seconds = 60;
};

struct ChunkedBody {
  const std::string* body;
  size_t offset = 0;
};

size_t ReadBody(char* buf, size_t size, size_t n, void* cls) {
  auto* b = static_cast<ChunkedBody*>(cls);
  size_t len = std::min(size * n, b->body->size() - b->offset);
  std::memcpy(buf, b->body->data() + b->offset, len);
  b->offset += len;
  return len;
}

HttpResult Call(const CallOptions& o) {
  HttpResult r;
  CURL* c = curl_easy_init();
  std::string url = (o.https_base.empty() ? "http://localhost" : o.https_base) + o.path;
  curl_easy_setopt(c, CURLOPT_URL, url.c_str());
  if (!o.unix_socket.empty()) curl_easy_setopt(c, CURLOPT_UNIX_SOCKET_PATH, o.unix_socket.c_str());
  if (!o.ca_file.empty()) curl_easy_setopt(c, CURLOPT_CAINFO, o.ca_file.c_str());
  if (!o.cert_file.empty()) curl_easy_setopt(c, CURLOPT_SSLCERT, o.cert_file.c_str());
  if (!o.key_file.empty()) curl_easy_setopt(c, CURLOPT_SSLKEY, o.key_file.c_str());
  curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, o.method.c_str());
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, Append);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &r.body);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, Append);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &r.headers);
  curl_easy_setopt(c, CURLOPT_TIMEOUT, o.timeout_seconds);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_slist* headers = nullptr;
  headers = curl_slist_append(headers, ("Content-Type: " + o.content_type).c_str());
  if (!o.accept.empty()) headers = curl_slist_append(headers, ("Accept: " + o.accept).c_str());
  if (!o.token.empty()) headers = curl_slist_append(headers, ("Authorization: Bearer " + o.token).c_str());
  ChunkedBody chunked{&o.body};
  if (o.chunked) {
    headers = curl_slist_append(headers, "Transfer-Encoding: chunked");
    curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(c, CURLOPT_READFUNCTION, ReadBody);
    curl_easy_setopt(c, CURLOPT_READDATA, &chunked);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, o.method.c_str());
  } else if (!o.body.empty()) {
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, o.body.data());
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(o.body.size()));
  }
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
  r.curl = curl_easy_perform(c);
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.code);
  curl_slist_free_all(headers);
  curl_easy_cleanup(c);
  return r;
}

std::string VmiJson(const std::string& name, const std::string& owner_uid = "", const std::string& extra_spec = "") {
  json vmi = json::parse(R"({
    "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
    "metadata": {"labels": {"app": "web"}},
    "spec": {"domain": {"devices": {"disks": [{"name": "containerdisk"}]}, "memory": {"guest": "64Mi"}},
             "volumes": [{"name": "containerdisk", "containerDisk": {"image": "example.com/disk:1"}}]}})");
  vmi["metadata"]["name"] = name;
  if (!owner_uid.empty()) {
    vmi["metadata"]["ownerReferences"] = {{{"apiVersion", "kubevirt.io/v1"},
                                           {"kind", "VirtualMachineInstanceReplicaSet"},
                                           {"name", "web"},
                                           {"uid", owner_uid},
                                           {"controller", true},
                                           {"blockOwnerDeletion", true}}};
  }
  if (!extra_spec.empty()) vmi["spec"].merge_patch(json::parse(extra_spec));
  return vmi.dump();
}

const char kVmisPath[] = "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances";
const char kVmirsPath[] = "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstancereplicasets";

// `regdisk serve` in a temp root, with the socket and a TLS endpoint on an
// ephemeral port.
class ApiServerTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    fs::create_directories(tmp() / "home");
    StartServer();
  }
  void TearDown() override {
    if (server_) server_->Terminate(std::chrono::seconds(10));
  }

  void StartServer() {
    Process::Options opt;
    opt.stderr_mode = Process::Stdio::kFile;
    log_ = P("serve-" + std::to_string(++starts_) + ".log");
    opt.stderr_file = log_;
    // --log-level info: tests wait for the daemon's log lines ("stopping VMI").
    std::vector<std::string> argv = {REGDISK_BIN, "--root", P("root"), "--log-level", "info", "serve", "--socket",
                                     P("api.sock"), "--listen", "127.0.0.1:0"};
    argv.insert(argv.end(), serve_args_.begin(), serve_args_.end());
    auto p = Process::Spawn(argv, opt);
    ASSERT_OK(p);
    server_.emplace(std::move(*p));
    // The port is on stderr (and in the kubeconfig) once it serves.
    for (int i = 0; i < 600 && port_ == 0; ++i) {
      std::string log = ReadFileCapped(log_, 1 << 20).value_or("");
      size_t at = log.rfind("(port ");
      if (at != std::string::npos && log.find(')', at) != std::string::npos) port_ = std::stoi(log.substr(at + 6));
      if (port_ == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      ASSERT_FALSE(server_->Poll().has_value()) << log;
    }
    ASSERT_NE(port_, 0) << ReadFileCapped(log_, 1 << 20).value_or("");
    token_ = ReadFileCapped(P("root/api/token"), 4096).value();
    while (!token_.empty() && token_.back() == '\n') token_.pop_back();
  }
  // These tests check the API alone: no VM runs (serve --api-only).
  std::vector<std::string> serve_args_ = {"--api-only"};

  int StopServer() {
    int code = server_->Terminate(std::chrono::seconds(10));
    server_.reset();
    port_ = 0;
    return code;
  }

  RunResult Kubectl(const std::vector<std::string>& args, std::string_view input = {}) {
    std::vector<std::string> argv = {kKubectl, "--cache-dir", P("home/cache")};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunProgram(argv, input, {"KUBECONFIG=" + P("root/kubeconfig"), "HOME=" + P("home")},
                      std::chrono::seconds(60));
  }
  bool HaveKubectl() const { return ::access(kKubectl, X_OK) == 0; }

  HttpResult Socket(const std::string& method, const std::string& path, const std::string& body = "",
                    const std::string& content_type = "application/json") {
    CallOptions o;
    o.method = method;
    o.path = path;
    o.body = body;
    o.content_type = content_type;
    o.unix_socket = P("api.sock");
    return Call(o);
  }
  CallOptions Tls(const std::string& path) {
    CallOptions o;
    o.path = path;
    o.https_base = "https://127.0.0.1:" + std::to_string(port_);
    o.ca_file = P("root/api/ca.crt");
    return o;
  }

  std::optional<Process> server_;
  std::string log_;
  int starts_ = 0;
  int port_ = 0;
  std::string token_;
};

mode_t Mode(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

TEST_F(ApiServerTest, SocketKubeconfigAndCredentialsAreOwnerOnlyAndSurviveARestart) {
  EXPECT_EQ(Mode(P("api.sock")), 0600u);
  EXPECT_EQ(Mode(P("root/kubeconfig")), 0600u);
  EXPECT_EQ(Mode(P("root/api")), 0700u);
  for (const char* f : {"root/api/token", "root/api/tls.key", "root/api/tls.crt", "root/api/ca.key", "root/api/ca.crt",
                        "root/api/client.key", "root/api/client.crt"}) {
    EXPECT_EQ(Mode(P(f)), 0600u) << f;
  }
  std::string kubeconfig = ReadFileCapped(P("root/kubeconfig"), 1 << 20).value();
  EXPECT_THAT(kubeconfig, HasSubstr("server: https://127.0.0.1:" + std::to_string(port_) + "\n"));
  EXPECT_THAT(kubeconfig, HasSubstr("token: " + token_ + "\n"));
  EXPECT_THAT(kubeconfig, Not(HasSubstr("client-key-data")));  // token is the default
  EXPECT_THAT(ReadFileCapped(log_, 1 << 20).value(), Not(HasSubstr(token_)));
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("keep")).code, 201);

  EXPECT_EQ(StopServer(), 0);
  EXPECT_FALSE(fs::exists(P("api.sock")));  // removed on SIGTERM
  const std::string old_token = token_;
  const std::string old_ca = ReadFileCapped(P("root/api/ca.crt"), 1 << 20).value();
  const std::string old_cert = ReadFileCapped(P("root/api/tls.crt"), 1 << 20).value();
  StartServer();
  EXPECT_EQ(token_, old_token);
  EXPECT_EQ(ReadFileCapped(P("root/api/ca.crt"), 1 << 20).value(), old_ca);
  EXPECT_EQ(ReadFileCapped(P("root/api/tls.crt"), 1 << 20).value(), old_cert);
  HttpResult got = Socket("GET", std::string(kVmisPath) + "/keep");
  EXPECT_EQ(got.code, 200) << got.body;
  EXPECT_EQ(got.Json()["metadata"]["name"], "keep");
  if (HaveKubectl()) {
    RunResult r = Kubectl({"get", "vmi", "keep", "-o", "name"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, "virtualmachineinstance.kubevirt.io/keep\n");
  }
  // A root from before the CA (its tls.crt self-signed) gets a CA, and
  // certificates it signed, at the next start; the token stays.
  EXPECT_EQ(StopServer(), 0);
  fs::remove(P("root/api/ca.crt"));
  fs::remove(P("root/api/ca.key"));
  StartServer();
  EXPECT_EQ(token_, old_token);
  EXPECT_NE(ReadFileCapped(P("root/api/ca.crt"), 1 << 20).value(), old_ca);
  EXPECT_NE(ReadFileCapped(P("root/api/tls.crt"), 1 << 20).value(), old_cert);
  CallOptions o = Tls(std::string(kVmisPath) + "/keep");
  o.token = token_;
  HttpResult again = Call(o);
  EXPECT_EQ(again.code, 200) << again.body << curl_easy_strerror(again.curl);
}

TEST_F(ApiServerTest, ASecondServeOnTheSameRootIsRefused) {
  RunResult second = RunRegdisk({"--root", P("root"), "serve", "--socket", P("second.sock"), "--api-only"});
  EXPECT_EQ(second.exit_code, 1) << second.err;
  EXPECT_THAT(second.err, HasSubstr("another regdisk serve (pid "));
  EXPECT_THAT(second.err, HasSubstr("give this one another --root"));
  EXPECT_FALSE(fs::exists(P("second.sock")));
}

TEST_F(ApiServerTest, TlsNeedsTheTokenAndErrorsAreStatusObjects) {
  CallOptions o = Tls("/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances");
  HttpResult none = Call(o);
  EXPECT_EQ(none.code, 401) << none.body;
  EXPECT_EQ(none.Json()["kind"], "Status");
  EXPECT_EQ(none.Json()["reason"], "Unauthorized");
  o.token = std::string(token_.size(), 'a');
  EXPECT_EQ(Call(o).code, 401);
  o.token = token_;
  HttpResult ok = Call(o);
  EXPECT_EQ(ok.code, 200) << ok.body;
  EXPECT_EQ(ok.Json()["kind"], "VirtualMachineInstanceList");

  struct Case {
    std::string method, path, body, content_type;
    long code;
    std::string reason;
  };
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("dup")).code, 201);
  json stale = json::parse(VmiJson("dup"));
  stale["metadata"]["resourceVersion"] = "1";
  const std::string rv_stale = stale.dump();
  std::vector<Case> cases = {
      {"GET", "/apis/kubevirt.io/v1/namespaces/default/flyingsaucers", "", "application/json", 404, "NotFound"},
      {"GET", "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances/nope", "", "application/json", 404, "NotFound"},
      {"GET", "/no/such/path", "", "application/json", 404, "NotFound"},
      {"PUT", kVmisPath, VmiJson("x"), "application/json", 405, "MethodNotAllowed"},
      {"POST", kVmisPath, VmiJson("x"), "text/plain", 415, "UnsupportedMediaType"},
      {"POST", kVmisPath, "{not json", "application/json", 400, "BadRequest"},
      {"POST", kVmisPath, VmiJson("dup"), "application/json", 409, "AlreadyExists"},
      {"PUT", std::string(kVmisPath) + "/dup", rv_stale, "application/json", 409, "Conflict"},
      {"POST", kVmisPath, VmiJson("stray", "no-such-uid"), "application/json", 409, "Conflict"},
      {"PUT", std::string(kVmisPath) + "/dup", VmiJson("dup"), "application/json", 422, "Invalid"},
      {"POST", kVmisPath, VmiJson("bad", "", R"({"domain":{"memory":{"guest":"lots"}}})"), "application/json", 422,
       "Invalid"},
      {"POST", "/api/v1/namespaces/elsewhere/secrets", R"({"apiVersion":"v1","kind":"Secret","metadata":{"name":"s"}})",
       "application/json", 404, "NotFound"},
      {"GET", std::string(kVmisPath) + "?labelSelector=a%20in%20(", "", "application/json", 400, "BadRequest"},
      {"DELETE", "/api/v1/namespaces/default", "", "application/json", 403, "Forbidden"},
      {"POST", kVmisPath, std::string(5000, '[') + std::string(5000, ']'), "application/json", 400, "BadRequest"},
      {"POST", kVmisPath, VmiJson("Not_A_DNS_Name"), "application/json", 422, "Invalid"},
  };
  for (const auto& c : cases) {
    HttpResult r = Socket(c.method, c.path, c.body, c.content_type);
    EXPECT_EQ(r.code, c.code) << c.method << " " << c.path << ": " << r.body;
    json status = r.Json();
    EXPECT_EQ(status["kind"], "Status") << c.method << " " << c.path << ": " << r.body;
    EXPECT_EQ(status["reason"], c.reason) << c.method << " " << c.path << ": " << r.body;
    EXPECT_EQ(status["code"], c.code) << c.path;
  }
  // The 422 names the field, as the API server's causes do.
  HttpResult invalid = Socket("POST", kVmisPath, VmiJson("bad", "", R"({"domain":{"memory":{"guest":"lots"}}})"));
  EXPECT_EQ(invalid.Json()["details"]["causes"][0]["field"], "spec.domain.memory.guest") << invalid.body;
}

// Connects to `socket` as user and group 65534 (nobody) from a child
// process and sends one request: "connect: <errno name>", or the first
// line of the answer.
std::string AsNobody(const std::string& socket) {
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) return "pipe failed";
  pid_t pid = fork();
  if (pid == 0) {
    // Only async-signal-safe calls from here on.
    auto say = [&](const char* s, size_t n) {
      (void)!write(pipe_fds[1], s, n);
      _exit(0);
    };
    if (setgroups(0, nullptr) != 0 || setgid(65534) != 0 || setuid(65534) != 0) say("setuid failed", 13);
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, socket.c_str(), socket.size());
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      if (errno == EACCES) say("connect: EACCES", 15);
      say("connect: other", 14);
    }
    const char req[] = "GET /api HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    (void)!write(fd, req, sizeof req - 1);
    char buf[64];
    ssize_t n = read(fd, buf, sizeof buf);
    say(buf, n > 0 ? static_cast<size_t>(n) : 0);
  }
  close(pipe_fds[1]);
  std::string out;
  char buf[256];
  for (ssize_t n; (n = read(pipe_fds[0], buf, sizeof buf)) > 0;) out.append(buf, static_cast<size_t>(n));
  close(pipe_fds[0]);
  waitpid(pid, nullptr, 0);
  return out.substr(0, out.find('\r'));
}

TEST_F(ApiServerTest, TheSocketServesOnlyItsOwnerAndRoot) {
  if (geteuid() != 0) GTEST_SKIP() << "connecting as another user needs root";
  ASSERT_EQ(::chmod(tmp().c_str(), 0711), 0);  // others may reach the socket file, not list the directory
  std::string refused = AsNobody(P("api.sock"));
  if (refused == "setuid failed") GTEST_SKIP() << "this container cannot change user";
  EXPECT_EQ(refused, "connect: EACCES");  // the socket is 0600
  // With the file opened up by mistake, the peer check still refuses.
  ASSERT_EQ(::chmod(P("api.sock").c_str(), 0666), 0);
  EXPECT_EQ(AsNobody(P("api.sock")), "HTTP/1.1 403 Forbidden");
  EXPECT_EQ(Socket("GET", "/api").code, 200);  // root is served
}

TEST_F(ApiServerTest, NamespacesHoldObjectsAndTakeThemWhenDeleted) {
  HttpResult ns = Socket("POST", "/api/v1/namespaces", R"({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"team"}})");
  ASSERT_EQ(ns.code, 201) << ns.body;
  EXPECT_EQ(ns.Json()["status"]["phase"], "Active");
  const std::string secret =
      R"({"apiVersion":"v1","kind":"Secret","metadata":{"name":"pull"},"type":"Opaque","stringData":{"userdata":"hi"}})";
  HttpResult created = Socket("POST", "/api/v1/namespaces/team/secrets", secret);
  ASSERT_EQ(created.code, 201) << created.body;
  EXPECT_EQ(created.Json()["data"]["userdata"], "aGk=");  // stringData becomes data, as in Kubernetes
  EXPECT_FALSE(created.Json().contains("stringData"));
  ASSERT_EQ(Socket("POST", "/apis/kubevirt.io/v1/namespaces/team/virtualmachineinstances", VmiJson("a")).code, 201);
  // Listed across namespaces, selected by namespace.
  HttpResult all = Socket("GET", "/apis/kubevirt.io/v1/virtualmachineinstances?fieldSelector=metadata.namespace%3Dteam");
  ASSERT_EQ(all.Json()["items"].size(), 1u) << all.body;
  EXPECT_EQ(Socket("DELETE", "/api/v1/namespaces/team").code, 200);
  EXPECT_EQ(Socket("GET", "/api/v1/namespaces/team/secrets/pull").code, 404);
  EXPECT_EQ(Socket("GET", "/apis/kubevirt.io/v1/virtualmachineinstances").Json()["items"].size(), 0u);
}

TEST_F(ApiServerTest, BodiesOverTheLimitAreRefusedAndTheServerKeepsAnswering) {
  const std::string big(100 * 1024 * 1024, 'x');
  CallOptions o;
  o.method = "POST";
  o.path = kVmisPath;
  o.body = big;
  o.unix_socket = P("api.sock");
  HttpResult with_length = Call(o);
  EXPECT_EQ(with_length.code, 413) << with_length.body;
  EXPECT_EQ(with_length.Json()["reason"], "RequestEntityTooLarge");
  // Without Content-Length the server reads up to the limit, then refuses.
  o.chunked = true;
  HttpResult chunked = Call(o);
  EXPECT_EQ(chunked.code, 413) << chunked.body << " curl " << chunked.curl;
  HttpResult health = Socket("GET", "/healthz");
  EXPECT_EQ(health.code, 200);
  EXPECT_EQ(health.body, "ok");
  // A body just under the limit is read (and refused as JSON, not for size).
  HttpResult under = Socket("POST", kVmisPath, std::string(3 * 1024 * 1024 - 10, ' '));
  EXPECT_EQ(under.code, 400) << under.body;
}

TEST_F(ApiServerTest, AHundredConcurrentCreatesListsAndWatchesAreAllAnswered) {
  std::atomic<int> answered{0}, created{0}, watched_events{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 100; ++i) {
    threads.emplace_back([&, i] {
      CallOptions o;
      o.unix_socket = P("api.sock");
      if (i % 5 == 0) {
        // A watch that ends by itself after a second.
        o.path = std::string(kVmisPath) + "?watch=true&timeoutSeconds=1";
        HttpResult r = Call(o);
        if (r.code == 200) {
          ++answered;
          for (char ch : r.body) watched_events += ch == '\n';
        }
      } else if (i % 2 == 0) {
        o.method = "POST";
        o.path = kVmisPath;
        o.body = VmiJson("vmi-" + std::to_string(i));
        HttpResult r = Call(o);
        if (r.code == 201) ++created, ++answered;
      } else {
        o.path = std::string(kVmisPath) + "?labelSelector=app%3Dweb&limit=500";
        HttpResult r = Call(o);
        if (r.code == 200 && r.Json()["kind"] == "VirtualMachineInstanceList") ++answered;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(answered.load(), 100);
  EXPECT_EQ(created.load(), 40);
  HttpResult list = Socket("GET", kVmisPath);
  EXPECT_EQ(list.Json()["items"].size(), 40u);
  EXPECT_EQ(Socket("GET", "/readyz").code, 200);
}

TEST_F(ApiServerTest, WatchResumesFromAResourceVersionOneEventPerLine) {
  HttpResult a = Socket("POST", kVmisPath, VmiJson("a"));
  ASSERT_EQ(a.code, 201);
  const std::string rv = a.Json()["metadata"]["resourceVersion"];
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("b")).code, 201);
  ASSERT_EQ(Socket("DELETE", std::string(kVmisPath) + "/a").code, 200);
  CallOptions o;
  o.unix_socket = P("api.sock");
  o.path = std::string(kVmisPath) + "?watch=1&timeoutSeconds=1&resourceVersion=" + rv;
  HttpResult w = Call(o);
  ASSERT_EQ(w.code, 200);
  EXPECT_THAT(w.headers, HasSubstr("chunked"));
  std::vector<json> events;
  std::istringstream lines(w.body);
  for (std::string line; std::getline(lines, line);) events.push_back(json::parse(line));
  ASSERT_EQ(events.size(), 2u) << w.body;
  EXPECT_EQ(events[0]["type"], "ADDED");
  EXPECT_EQ(events[0]["object"]["metadata"]["name"], "b");
  EXPECT_EQ(events[1]["type"], "DELETED");
  EXPECT_EQ(events[1]["object"]["metadata"]["name"], "a");
}

TEST_F(ApiServerTest, AWatchOnStatusPhaseSeesObjectsEnterAndLeaveTheSelection) {
  HttpResult a = Socket("POST", kVmisPath, VmiJson("a"));
  ASSERT_EQ(a.code, 201);
  const std::string rv = a.Json()["metadata"]["resourceVersion"];
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("b")).code, 201);
  for (const char* phase : {"Running", "Failed"}) {
    HttpResult r = Socket("PATCH", std::string(kVmisPath) + "/a/status",
                          std::string(R"({"status":{"phase":")") + phase + "\"}}", "application/merge-patch+json");
    ASSERT_EQ(r.code, 200) << r.body;
  }
  CallOptions o;
  o.unix_socket = P("api.sock");
  o.path = std::string(kVmisPath) + "?watch=1&timeoutSeconds=1&fieldSelector=status.phase%3DRunning&resourceVersion=" + rv;
  HttpResult w = Call(o);
  ASSERT_EQ(w.code, 200) << w.body;
  std::vector<std::string> events;
  std::istringstream lines(w.body);
  for (std::string line; std::getline(lines, line);) {
    json ev = json::parse(line);
    events.push_back(ev["type"].get<std::string>() + " " + ev["object"]["metadata"]["name"].get<std::string>());
  }
  // b never runs; a enters the selection (ADDED), then leaves it (DELETED).
  EXPECT_EQ(events, (std::vector<std::string>{"ADDED a", "DELETED a"})) << w.body;
  HttpResult list = Socket("GET", std::string(kVmisPath) + "?fieldSelector=status.phase%21%3DRunning");
  EXPECT_EQ(list.Json()["items"].size(), 2u) << list.body;
}

// --- kubectl --------------------------------------------------------------

class KubectlApiTest : public ApiServerTest {
 protected:
  void SetUp() override {
    if (!HaveKubectl()) GTEST_SKIP() << kKubectl << " is not installed";
    ApiServerTest::SetUp();
  }
  std::string Replicas() {
    return Kubectl({"get", "vmirs", "web", "-o", "jsonpath={.spec.replicas}"}).out;
  }
};

const char kReplicaSet[] = R"(apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceReplicaSet
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      domain:
        devices:
          disks:
          - name: containerdisk
        memory:
          guest: 64Mi
      volumes:
      - name: containerdisk
        containerDisk:
          image: example.com/disk:1
)";

TEST_F(KubectlApiTest, ApplyGetScalePatchAndDeleteAReplicaSetWithItsVmis) {
  ASSERT_OK(WriteFileAtomic(P("rs.yaml"), kReplicaSet));
  RunResult apply = Kubectl({"apply", "-f", P("rs.yaml")});
  ASSERT_EQ(apply.exit_code, 0) << apply.err;
  EXPECT_EQ(apply.out, "virtualmachineinstancereplicaset.kubevirt.io/web created\n");
  // Applying again changes nothing.
  RunResult again = Kubectl({"apply", "-f", P("rs.yaml")});
  EXPECT_EQ(again.out, "virtualmachineinstancereplicaset.kubevirt.io/web unchanged\n") << again.err;

  RunResult got = Kubectl({"get", "vmirs", "web", "-o", "json"});
  ASSERT_EQ(got.exit_code, 0) << got.err;
  json rs = json::parse(got.out);
  EXPECT_EQ(rs["spec"]["replicas"], 3);
  EXPECT_EQ(rs["metadata"]["generation"], 1);
  EXPECT_EQ(rs["metadata"]["namespace"], "default");
  EXPECT_FALSE(rs["metadata"]["uid"].get<std::string>().empty());
  EXPECT_FALSE(rs["metadata"]["resourceVersion"].get<std::string>().empty());
  EXPECT_TRUE(rs["metadata"].contains("creationTimestamp"));
  const std::string uid = rs["metadata"]["uid"];

  RunResult wide = Kubectl({"get", "vmirss", "-o", "wide"});
  ASSERT_EQ(wide.exit_code, 0) << wide.err;
  EXPECT_THAT(wide.out, HasSubstr("NAME   DESIRED   CURRENT   READY   AGE"));
  EXPECT_THAT(wide.out, HasSubstr("web    3 "));

  RunResult scale = Kubectl({"scale", "vmirs", "web", "--replicas", "5"});
  EXPECT_EQ(scale.exit_code, 0) << scale.err;
  EXPECT_EQ(Replicas(), "5");
  EXPECT_EQ(Kubectl({"get", "vmirs", "web", "-o", "jsonpath={.metadata.generation}"}).out, "2");
  EXPECT_EQ(Kubectl({"patch", "vmirs", "web", "--type", "merge", "-p", R"({"spec":{"replicas":2}})"}).exit_code, 0);
  EXPECT_EQ(Replicas(), "2");
  RunResult jp = Kubectl({"patch", "vmirs", "web", "--type", "json", "-p",
                          R"([{"op":"replace","path":"/spec/replicas","value":4}])"});
  EXPECT_EQ(jp.exit_code, 0) << jp.err;
  EXPECT_EQ(Replicas(), "4");
  // The scale subresource as the autoscaler sees it.
  HttpResult s = Socket("GET", std::string(kVmirsPath) + "/web/scale");
  EXPECT_EQ(s.Json()["kind"], "Scale");
  EXPECT_EQ(s.Json()["spec"]["replicas"], 4);
  EXPECT_EQ(s.Json()["status"]["selector"], "app=web");

  // Two VMIs the set owns and one it does not.
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("web-abcde", uid)).code, 201);
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("web-fghij", uid)).code, 201);
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("standalone")).code, 201);
  RunResult vmis = Kubectl({"get", "vmis", "-o", "wide"});
  EXPECT_THAT(vmis.out, HasSubstr("NAME         AGE   PHASE   IP    NODENAME   READY   LIVE-MIGRATABLE   PAUSED"));
  RunResult narrow = Kubectl({"get", "vmi"});
  EXPECT_THAT(narrow.out, HasSubstr("NAME         AGE   PHASE   IP    NODENAME   READY\n"));
  RunResult selected = Kubectl({"get", "vmis", "--field-selector", "metadata.name=standalone", "-o", "name"});
  EXPECT_EQ(selected.out, "virtualmachineinstance.kubevirt.io/standalone\n") << selected.err;

  // Server-side apply creates, then merges (no managedFields: a simplification).
  std::string ssa = kReplicaSet;
  ssa.replace(ssa.find("name: web\n"), 10, "name: web2\n");
  ASSERT_OK(WriteFileAtomic(P("rs2.yaml"), ssa));
  RunResult server_side = Kubectl({"apply", "--server-side", "-f", P("rs2.yaml")});
  EXPECT_EQ(server_side.exit_code, 0) << server_side.err;
  EXPECT_EQ(server_side.out, "virtualmachineinstancereplicaset.kubevirt.io/web2 serverside-applied\n");
  ssa.replace(ssa.find("replicas: 3"), 11, "replicas: 6");
  ASSERT_OK(WriteFileAtomic(P("rs2.yaml"), ssa));
  EXPECT_EQ(Kubectl({"apply", "--server-side", "-f", P("rs2.yaml")}).exit_code, 0);
  EXPECT_EQ(Kubectl({"get", "vmirs", "web2", "-o", "jsonpath={.spec.replicas}"}).out, "6");
  ASSERT_EQ(Kubectl({"delete", "vmirs", "web2"}).exit_code, 0);

  RunResult del = Kubectl({"delete", "-f", P("rs.yaml")});
  EXPECT_EQ(del.exit_code, 0) << del.err;
  EXPECT_EQ(del.out, "virtualmachineinstancereplicaset.kubevirt.io \"web\" deleted\n");
  EXPECT_EQ(Kubectl({"get", "vmis", "-o", "name"}).out, "virtualmachineinstance.kubevirt.io/standalone\n");
  RunResult gone = Kubectl({"get", "vmirs", "web"});
  EXPECT_NE(gone.exit_code, 0);
  EXPECT_THAT(gone.err, HasSubstr("virtualmachineinstancereplicasets.kubevirt.io \"web\" not found"));
}

TEST_F(KubectlApiTest, UnknownFieldsGetTheStrictDecodingErrorAndValidateFlagsAreHonoured) {
  std::string text = kReplicaSet;
  text.replace(text.find("  replicas: 3\n"), 14, "  replicas: 3\n  replicaz: 4\n");
  ASSERT_OK(WriteFileAtomic(P("typo.yaml"), text));
  RunResult strict = Kubectl({"apply", "-f", P("typo.yaml")});
  EXPECT_EQ(strict.exit_code, 1);
  EXPECT_THAT(strict.err, HasSubstr("VirtualMachineInstanceReplicaSet in version \"v1\" cannot be handled as a "
                                    "VirtualMachineInstanceReplicaSet: strict decoding error: unknown field "
                                    "\"spec.replicaz\""));
  EXPECT_NE(Kubectl({"get", "vmirs", "web"}).exit_code, 0);  // nothing stored

  RunResult warn = Kubectl({"apply", "--validate=warn", "-f", P("typo.yaml")});
  EXPECT_EQ(warn.exit_code, 0) << warn.err;
  EXPECT_THAT(warn.err, HasSubstr("unknown field \"spec.replicaz\""));
  EXPECT_EQ(Kubectl({"get", "vmirs", "web", "-o", "jsonpath={.spec.replicaz}"}).out, "");  // dropped
  ASSERT_EQ(Kubectl({"delete", "vmirs", "web"}).exit_code, 0);
  RunResult ignore = Kubectl({"create", "--validate=false", "-f", P("typo.yaml")});
  EXPECT_EQ(ignore.exit_code, 0) << ignore.err;
  EXPECT_THAT(ignore.err, Not(HasSubstr("replicaz")));

  // KubeVirt's own rules: 422 with the field.
  std::string bad = kReplicaSet;
  bad.replace(bad.find("guest: 64Mi"), 11, "guest: lots");
  ASSERT_OK(WriteFileAtomic(P("bad.yaml"), bad));
  RunResult invalid = Kubectl({"apply", "-f", P("bad.yaml")});
  EXPECT_EQ(invalid.exit_code, 1);
  EXPECT_THAT(invalid.err, HasSubstr("is invalid: spec.template.spec.domain.memory.guest"));
}

TEST_F(KubectlApiTest, GetWatchPrintsChangesAsTheyHappen) {
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("first")).code, 201);
  Process::Options opt;
  opt.stdout_mode = Process::Stdio::kPipe;
  opt.stderr_mode = Process::Stdio::kPipe;
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  env.push_back("KUBECONFIG=" + P("root/kubeconfig"));
  env.push_back("HOME=" + P("home"));
  opt.env = env;
  auto watch = Process::Spawn({kKubectl, "--cache-dir", P("home/cache"), "get", "vmis", "-w"}, opt);
  ASSERT_OK(watch);
  std::string out;
  auto read_until = [&](const std::string& want) {
    for (int i = 0; i < 300 && out.find(want) == std::string::npos; ++i) {
      pollfd pfd{watch->stdout_fd(), POLLIN, 0};
      if (poll(&pfd, 1, 100) > 0) {
        char buf[4096];
        ssize_t n = read(watch->stdout_fd(), buf, sizeof buf);
        if (n <= 0) break;
        out.append(buf, static_cast<size_t>(n));
      }
    }
    return out.find(want) != std::string::npos;
  };
  EXPECT_TRUE(read_until("first ")) << out;
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("second")).code, 201);
  EXPECT_TRUE(read_until("second ")) << out;
  watch->Terminate(std::chrono::seconds(5));
  EXPECT_THAT(out, HasSubstr("NAME    AGE   PHASE   IP    NODENAME   READY\n"));
  // One header: the watch's rows follow the list's.
  EXPECT_EQ(out.rfind("NAME ", 0), 0u) << out;
  EXPECT_EQ(out.find("\nNAME "), std::string::npos) << out;
}

// --- In-process ---------------------------------------------------------------

class KubeApiTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    state::ObjectStore::Options so;
    so.event_max_count = 3;
    so.sync_every_commit = false;
    so.now = [] { return int64_t{1800000000}; };
    store_ = state::ObjectStore::Open(tmp() / "state.db", so).value();
    ASSERT_OK(api::KubeApi::EnsureDefaultNamespace(store_.get()));
    api::KubeApi::Options o;
    o.store = store_.get();
    o.now = [] { return int64_t{1800000000 + 150}; };
    api_.emplace(o);
  }
  api::HttpResponse Do(const std::string& method, const std::string& path, std::multimap<std::string, std::string> query = {},
                       const std::string& body = "", const std::string& accept = "") {
    api::HttpRequest req;
    req.method = method;
    req.path = path;
    req.query = std::move(query);
    req.body = body;
    req.headers["content-type"] = "application/json";
    if (!accept.empty()) req.headers["accept"] = accept;
    req.stop = &stop_;
    return api_->Handle(req);
  }
  std::unique_ptr<state::ObjectStore> store_;
  std::optional<api::KubeApi> api_;
  CancelToken stop_;
};

TEST_F(KubeApiTest, AWatchFromPrunedEventsGetsGoneAsAnErrorEvent) {
  for (int i = 0; i < 6; ++i) ASSERT_EQ(Do("POST", kVmisPath, {}, VmiJson("v" + std::to_string(i))).status, 201);
  api::HttpResponse w = Do("GET", kVmisPath, {{"watch", "true"}, {"resourceVersion", "2"}});
  ASSERT_EQ(w.status, 200);
  ASSERT_TRUE(w.stream);
  std::string line = w.stream->Next().value();
  json ev = json::parse(line);
  EXPECT_EQ(ev["type"], "ERROR");
  EXPECT_EQ(ev["object"]["code"], 410);
  EXPECT_EQ(ev["object"]["reason"], "Expired");
  EXPECT_EQ(w.stream->Next().value(), "");
}

TEST_F(KubeApiTest, TableCellsFollowKubeVirtsPrinterColumns) {
  ASSERT_EQ(Do("POST", kVmisPath, {}, VmiJson("web-1")).status, 201);
  json status = {{"apiVersion", "kubevirt.io/v1"},
                 {"kind", "VirtualMachineInstance"},
                 {"metadata", {{"name", "web-1"}, {"namespace", "default"}}},
                 {"status",
                  {{"phase", "Running"},
                   {"nodeName", "node1"},
                   {"interfaces", {{{"ipAddress", "10.0.2.15"}}}},
                   {"conditions", {{{"type", "Ready"}, {"status", "True"}}, {{"type", "LiveMigratable"}, {"status", "False"}}}}}}};
  api::HttpResponse put = Do("PUT", std::string(kVmisPath) + "/web-1/status", {}, status.dump());
  ASSERT_EQ(put.status, 200) << put.body;
  api::HttpResponse t = Do("GET", kVmisPath, {}, "", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json");
  json table = json::parse(t.body);
  ASSERT_EQ(table["kind"], "Table") << t.body;
  std::vector<std::string> names;
  for (const auto& c : table["columnDefinitions"]) names.push_back(c["name"]);
  EXPECT_EQ(names, (std::vector<std::string>{"Name", "Age", "Phase", "IP", "NodeName", "Ready", "Live-Migratable", "Paused"}));
  EXPECT_EQ(table["rows"][0]["cells"], json::parse(R"(["web-1","2m30s","Running","10.0.2.15","node1","True","False",null])"));
  EXPECT_EQ(table["columnDefinitions"][6]["priority"], 1);
  // Without the Table media type, a plain list.
  EXPECT_EQ(json::parse(Do("GET", kVmisPath, {}, "", "application/json").body)["kind"], "VirtualMachineInstanceList");
}

TEST_F(KubeApiTest, DeletePropagationForegroundBackgroundAndOrphan) {
  auto set = [&](const std::string& name) {
    json rs = {{"apiVersion", "kubevirt.io/v1"}, {"kind", "VirtualMachineInstanceReplicaSet"},
               {"metadata", {{"name", name}, {"namespace", "default"}}}, {"spec", {{"replicas", 0}}}};
    return store_->Create(api::kVmirsKey, rs).value()["metadata"]["uid"].get<std::string>();
  };
  auto vmi = [&](const std::string& name, const std::string& owner, bool keep) {
    json v = json::parse(VmiJson(name, owner));
    if (keep) v["metadata"]["finalizers"] = {"example.com/keep"};
    ASSERT_EQ(Do("POST", kVmisPath, {}, v.dump()).status, 201);
  };
  auto code = [&](const std::string& path) { return Do("GET", path).status; };
  auto get = [&](const std::string& path) { return json::parse(Do("GET", path).body); };
  auto patch = [&](const std::string& path, const std::string& body) {
    api::HttpRequest req;
    req.method = "PATCH";
    req.path = path;
    req.body = body;
    req.headers["content-type"] = "application/merge-patch+json";
    req.stop = &stop_;
    return api_->Handle(req);
  };
  const std::string sets = kVmirsPath, vmis = kVmisPath;

  // Foreground: the set stays, marked, until its blocking VMIs are gone.
  std::string uid = set("fg");
  vmi("fg-a", uid, false);
  vmi("fg-b", uid, true);
  api::HttpResponse fg = Do("DELETE", sets + "/fg", {}, R"({"kind":"DeleteOptions","apiVersion":"v1","propagationPolicy":"Foreground"})");
  ASSERT_EQ(fg.status, 200) << fg.body;
  json marked = json::parse(fg.body);
  EXPECT_EQ(marked["metadata"]["finalizers"], json({"foregroundDeletion"}));
  EXPECT_TRUE(marked["metadata"].contains("deletionTimestamp"));
  EXPECT_EQ(marked["metadata"]["deletionGracePeriodSeconds"], 0);
  EXPECT_EQ(code(sets + "/fg"), 200);
  EXPECT_EQ(code(vmis + "/fg-a"), 404);
  EXPECT_TRUE(get(vmis + "/fg-b")["metadata"].contains("deletionTimestamp"));
  // Deleting it again changes nothing.
  api::HttpResponse again = Do("DELETE", sets + "/fg");
  EXPECT_EQ(again.status, 200);
  EXPECT_EQ(json::parse(again.body), get(sets + "/fg"));
  EXPECT_EQ(get(sets + "/fg")["metadata"]["resourceVersion"], marked["metadata"]["resourceVersion"]);
  // The user's finalizer comes off fg-b: it goes, then the set.
  api::HttpResponse released = patch(vmis + "/fg-b", R"({"metadata":{"finalizers":null}})");
  EXPECT_EQ(released.status, 200) << released.body;
  EXPECT_EQ(code(vmis + "/fg-b"), 404);
  EXPECT_EQ(code(sets + "/fg"), 404);

  // Background (the default): the set goes now, its VMIs after it.
  uid = set("bg");
  vmi("bg-a", uid, false);
  vmi("bg-b", uid, true);
  EXPECT_EQ(Do("DELETE", sets + "/bg").status, 200);
  EXPECT_EQ(code(sets + "/bg"), 404);
  EXPECT_EQ(code(vmis + "/bg-a"), 404);
  EXPECT_TRUE(get(vmis + "/bg-b")["metadata"].contains("deletionTimestamp"));
  // No new finalizer on an object being deleted: 422, as Kubernetes words it.
  api::HttpResponse late = patch(vmis + "/bg-b", R"({"metadata":{"finalizers":["example.com/keep","example.com/late"]}})");
  EXPECT_EQ(late.status, 422) << late.body;
  json st = json::parse(late.body);
  EXPECT_EQ(st["kind"], "Status");
  EXPECT_EQ(st["reason"], "Invalid");
  EXPECT_EQ(st["message"], "VirtualMachineInstance.kubevirt.io \"bg-b\" is invalid: metadata.finalizers: Forbidden: no new "
                           "finalizers can be added if the object is being deleted, found new finalizers "
                           "[]string{\"example.com/late\"}");
  EXPECT_EQ(st["details"]["causes"][0]["reason"], "FieldValueForbidden");
  EXPECT_EQ(st["details"]["causes"][0]["field"], "metadata.finalizers");
  // Nor can a client clear deletionTimestamp.
  api::HttpResponse clear = patch(vmis + "/bg-b", R"({"metadata":{"deletionTimestamp":null}})");
  EXPECT_EQ(clear.status, 200) << clear.body;
  EXPECT_TRUE(get(vmis + "/bg-b")["metadata"].contains("deletionTimestamp"));

  // Orphan: the set goes; its VMIs stay, without the owner reference.
  uid = set("or");
  vmi("or-a", uid, false);
  EXPECT_EQ(Do("DELETE", sets + "/or", {}, R"({"propagationPolicy":"Orphan"})").status, 200);
  EXPECT_EQ(code(sets + "/or"), 404);
  json orphan = get(vmis + "/or-a");
  EXPECT_FALSE(orphan["metadata"].contains("ownerReferences")) << orphan.dump();
  EXPECT_FALSE(orphan["metadata"].contains("deletionTimestamp"));
  // The deprecated orphanDependents says the same; an unknown policy is 422.
  uid = set("or2");
  vmi("or2-a", uid, false);
  EXPECT_EQ(Do("DELETE", sets + "/or2", {}, R"({"orphanDependents":true})").status, 200);
  EXPECT_EQ(code(vmis + "/or2-a"), 200);
  api::HttpResponse bad = Do("DELETE", vmis + "/or2-a", {}, R"({"propagationPolicy":"Sometimes"})");
  EXPECT_EQ(bad.status, 422);
  EXPECT_THAT(json::parse(bad.body)["message"].get<std::string>(),
              HasSubstr("propagationPolicy: Unsupported value: \"Sometimes\": supported values: \"Foreground\", "
                        "\"Background\", \"Orphan\""));
  EXPECT_EQ(code(vmis + "/or2-a"), 200);
}

TEST(HumanDurationTest, MatchesKubernetes) {
  EXPECT_EQ(api::HumanDuration(0), "0s");
  EXPECT_EQ(api::HumanDuration(119), "119s");
  EXPECT_EQ(api::HumanDuration(150), "2m30s");
  EXPECT_EQ(api::HumanDuration(600), "10m");
  EXPECT_EQ(api::HumanDuration(3 * 3600 + 60), "3h1m");
  EXPECT_EQ(api::HumanDuration(30 * 3600), "30h");
  EXPECT_EQ(api::HumanDuration(3 * 86400 + 3600), "3d1h");
  EXPECT_EQ(api::HumanDuration(100 * 86400), "100d");
  EXPECT_EQ(api::HumanDuration(3 * 365 * 86400 + 86400), "3y1d");
}

// The whole node, as the issue's user drives it: `regdisk serve` with its
// engine, the real kubectl, QEMU (KVM or TCG) and a registry. The guest is
// the boot sector (guest/hello.S) told to stay up.
class NodeE2eTest : public ApiServerTest {
 protected:
  void SetUp() override {
    if (!HaveKubectl()) GTEST_SKIP() << kKubectl << " is not installed";
    TempDirTest::SetUp();
    TestRegistry::Extra extra;
    extra.access_log = true;
    auto reg = TestRegistry::Start(RegistryMode::kPlain, {}, extra);
    ASSERT_OK(reg);
    reg_ = std::move(*reg);
    std::string raw = ReadFileCapped(REGDISK_GUEST_IMAGE, 512).value();
    std::string sector1 = "PRISTINE-SECTOR-CONTENT";
    sector1.resize(512, '\0');
    raw += sector1 + "STAY-UP";
    raw.resize(1 << 20, '\0');
    ASSERT_OK(WriteFileAtomic(tmp() / "halt.raw", raw));
    image_ = reg_->host() + "/vmdisks/halt:v1";
    RunResult built = RunRegdisk({"build", P("halt.raw"), "-t", "docker://" + image_});
    ASSERT_EQ(built.exit_code, 0) << built.err;
    serve_args_ = {};
    fs::create_directories(tmp() / "home");
    StartServer();
  }
  void TearDown() override {
    if (server_) {
      // The VMs outlive a daemon on purpose; a test stops them itself.
      server_->Terminate(std::chrono::seconds(10));
      server_.reset();
    }
    RunProgram({"pkill", "-KILL", "-f", P("root/run")});
  }

  // Waits until `done` holds: a bounded wait for QEMU under TCG on a busy
  // machine, not a timing assertion.
  bool Eventually(const std::function<bool()>& done, std::chrono::seconds limit = std::chrono::seconds(120)) {
    auto until = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < until) {
      if (done()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return done();
  }
  // name -> phase of every VMI, as kubectl shows them.
  std::map<std::string, std::string> Phases() {
    RunResult r = Kubectl({"get", "vmis", "-o", "json"});
    std::map<std::string, std::string> out;
    if (r.exit_code != 0) return out;
    const json list = json::parse(r.out, nullptr, false);
    if (!list.is_object() || !list.contains("items")) return out;
    for (const auto& v : list["items"]) {
      out[v["metadata"]["name"]] = v.contains("status") ? v["status"].value("phase", "") : "";
    }
    return out;
  }
  int Running() {
    int n = 0;
    for (const auto& [name, phase] : Phases()) n += phase == "Running";
    return n;
  }
  // The QEMU pid of each running VMI, from its run directory.
  std::map<std::string, int> Pids() {
    std::map<std::string, int> out;
    for (const auto& e : fs::directory_iterator(tmp() / "root" / "run")) {
      auto text = ReadFileCapped(e.path() / "vm.json", 1 << 20);
      if (!text.ok()) continue;
      const json record = json::parse(*text);
      out[record["name"]] = record["qemuPid"];
    }
    return out;
  }
  int Qemus() {
    RunResult r = RunProgram({"pgrep", "-f", P("root/run")});
    int n = 0;
    for (char ch : r.out) n += ch == '\n';
    return n;
  }

  std::unique_ptr<TestRegistry> reg_;
  std::string image_;
};

TEST_F(NodeE2eTest, KubectlRunsAReplicaSetThatHealsScalesAndSurvivesAKilledDaemon) {
  ASSERT_OK(WriteFileAtomic(P("rs.yaml"), R"(apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceReplicaSet
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      domain:
        devices:
          disks:
          - name: root
            disk:
              bus: virtio
        resources:
          requests:
            memory: 64M
      volumes:
      - name: root
        containerDisk:
          image: )" + image_ + "\n"));
  RunResult apply = Kubectl({"apply", "-f", P("rs.yaml")});
  ASSERT_EQ(apply.exit_code, 0) << apply.err;
  ASSERT_TRUE(Eventually([&] { return Running() == 3; })) << Kubectl({"get", "vmis", "-o", "yaml"}).out;

  // One pull for three VMs: each blob left the registry once.
  std::map<std::string, int> gets;
  const std::string log = reg_->log(), what = "GET /v2/vmdisks/halt/blobs/";
  for (size_t at = log.find(what); at != std::string::npos; at = log.find(what, at + 1)) gets[log.substr(at + what.size(), 71)]++;
  EXPECT_FALSE(gets.empty());
  for (const auto& [digest, n] : gets) EXPECT_EQ(n, 1) << digest;
  // Each console shows the guest's marker; kubectl prints KubeVirt's columns.
  for (const auto& [name, phase] : Phases()) {
    EXPECT_TRUE(Eventually([&] {
      return ReadFileCapped(P("root/logs/default_" + name + ".log"), 1 << 20).value_or("").find("PRISTINE-SECTOR-CONTENT") !=
             std::string::npos;
    })) << name;
  }
  RunResult wide = Kubectl({"get", "vmis", "-o", "wide"});
  EXPECT_THAT(wide.out, HasSubstr("Running"));
  EXPECT_THAT(wide.out, HasSubstr("10.0.2.2"));

  // Kill one VMI's QEMU: `kubectl get vmis -w` shows its replacement Running.
  Process::Options wopt;
  wopt.stdout_mode = Process::Stdio::kFile;
  wopt.stdout_file = P("watch.out");
  wopt.env = std::vector<std::string>{"KUBECONFIG=" + P("root/kubeconfig"), "HOME=" + P("home"), "PATH=/usr/bin:/bin"};
  auto watch = Process::Spawn({kKubectl, "--cache-dir", P("home/cache"), "get", "vmis", "-w"}, wopt);
  ASSERT_OK(watch);
  std::map<std::string, int> before = Pids();
  const std::string victim = before.begin()->first;
  ASSERT_EQ(::kill(before.begin()->second, SIGKILL), 0);
  std::string replacement;
  ASSERT_TRUE(Eventually([&] {
    auto phases = Phases();
    if (phases.count(victim) || Running() != 3) return false;
    for (const auto& [name, phase] : phases) {
      if (!before.count(name)) replacement = name;
    }
    return !replacement.empty();
  })) << Kubectl({"get", "vmis"}).out;
  EXPECT_TRUE(Eventually([&] {
    std::string w = ReadFileCapped(P("watch.out"), 1 << 20).value_or("");
    size_t at = w.rfind(replacement);
    return at != std::string::npos && w.find("Running", at) != std::string::npos;
  })) << ReadFileCapped(P("watch.out"), 1 << 20).value_or("");
  watch->Terminate(std::chrono::seconds(5));
  RunResult events = Kubectl({"get", "events", "-o", "json"});
  EXPECT_THAT(events.out, HasSubstr("SuccessfulCreate"));
  EXPECT_THAT(events.out, HasSubstr("\"Failed\""));

  // Scale down to 1 and up to 4.
  ASSERT_EQ(Kubectl({"scale", "vmirs", "web", "--replicas", "1"}).exit_code, 0);
  ASSERT_TRUE(Eventually([&] { return Phases().size() == 1 && Qemus() == 1; })) << Kubectl({"get", "vmis"}).out;
  ASSERT_EQ(Kubectl({"scale", "vmirs", "web", "--replicas", "4"}).exit_code, 0);
  ASSERT_TRUE(Eventually([&] { return Running() == 4; })) << Kubectl({"get", "vmis"}).out;

  // kill -9 the daemon: the QEMUs run on; a new daemon adopts the same pids
  // and kubectl shows no change.
  std::map<std::string, int> pids = Pids();
  ASSERT_EQ(pids.size(), 4u);
  std::map<std::string, std::string> phases = Phases();
  server_->Signal(SIGKILL);
  server_->Wait(std::chrono::seconds(10));
  server_.reset();
  port_ = 0;
  for (const auto& [name, pid] : pids) EXPECT_EQ(::kill(pid, 0), 0) << name;
  StartServer();
  std::this_thread::sleep_for(std::chrono::seconds(2));  // passes of the new daemon, which must change nothing
  EXPECT_EQ(Phases(), phases);
  EXPECT_EQ(Pids(), pids);
  RunResult metrics = RunProgram({"curl", "-sk", "-H", "Authorization: Bearer " + token_,
                                  "https://127.0.0.1:" + std::to_string(port_) + "/metrics"});
  EXPECT_THAT(metrics.out, HasSubstr("regdisk_vmis{phase=\"Running\"} 4"));

  // Delete the set: no QEMU, overlay, seed, socket or run directory remains.
  ASSERT_EQ(Kubectl({"delete", "-f", P("rs.yaml")}).exit_code, 0);
  ASSERT_TRUE(Eventually([&] { return Phases().empty() && Qemus() == 0 && fs::is_empty(tmp() / "root" / "run"); }))
      << Kubectl({"get", "vmis"}).out;
}


// The process runs (a zombie, exited but not yet reaped by whoever adopted
// it, does not).
bool Alive(int pid) {
  if (::kill(pid, 0) != 0) return false;
  std::string stat = ReadFileCapped("/proc/" + std::to_string(pid) + "/stat", 4096).value_or("");
  size_t paren = stat.rfind(')');
  return paren == std::string::npos || paren + 2 >= stat.size() || stat[paren + 2] != 'Z';
}

// A VMI of the boot-sector disk, with `finalizers` (YAML list items) if any.
std::string HaltVmi(const std::string& name, const std::string& image, const std::string& finalizers = "") {
  return "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata:\n  name: " + name + "\n" +
         (finalizers.empty() ? "" : "  finalizers:\n" + finalizers) + R"(spec:
  domain:
    devices:
      disks:
      - name: root
        disk:
          bus: virtio
    resources:
      requests:
        memory: 64M
  volumes:
  - name: root
    containerDisk:
      image: )" + image + "\n";
}

TEST_F(NodeE2eTest, KubectlDeleteEndsWhenTheQemuAndItsFilesAreGoneAndAUserFinalizerHoldsTheVmi) {
  ASSERT_OK(WriteFileAtomic(P("a.yaml"), HaltVmi("a", image_)));
  ASSERT_OK(WriteFileAtomic(P("b.yaml"), HaltVmi("b", image_, "  - example.com/keep\n")));
  ASSERT_OK(WriteFileAtomic(P("c.yaml"), HaltVmi("c", image_)));
  ASSERT_EQ(Kubectl({"apply", "-f", P("a.yaml")}).exit_code, 0);
  ASSERT_EQ(Kubectl({"apply", "-f", P("b.yaml")}).exit_code, 0);
  ASSERT_EQ(Kubectl({"apply", "-f", P("c.yaml")}).exit_code, 0);
  ASSERT_TRUE(Eventually([&] { return Running() == 3 && Pids().size() == 3; })) << Kubectl({"get", "vmis", "-o", "yaml"}).out;
  const std::map<std::string, int> pids = Pids();
  const std::string uid_a = Kubectl({"get", "vmi", "a", "-o", "jsonpath={.metadata.uid}"}).out;
  const std::string uid_b = Kubectl({"get", "vmi", "b", "-o", "jsonpath={.metadata.uid}"}).out;
  ASSERT_FALSE(uid_a.empty());
  // KubeVirt's finalizer, as a cluster shows it.
  RunResult yaml = Kubectl({"get", "vmi", "a", "-o", "yaml"});
  EXPECT_THAT(yaml.out, HasSubstr("  finalizers:\n  - kubevirt.io/foregroundDeleteVirtualMachine\n")) << yaml.out;
  auto run_dir_of = [&](const std::string& uid) {
    for (const auto& e : fs::directory_iterator(tmp() / "root" / "run")) {
      if (e.path().filename().string().find(uid) != std::string::npos) return true;
    }
    return false;
  };
  ASSERT_TRUE(run_dir_of(uid_a));

  // kubectl delete waits (its default) until the VMI is gone, which is once
  // its QEMU has stopped and its run directory (overlay, seed, sockets) is
  // removed: all of that holds when it returns, not eventually.
  RunResult del = Kubectl({"delete", "vmi", "a"});
  ASSERT_EQ(del.exit_code, 0) << del.err;
  EXPECT_EQ(del.out, "virtualmachineinstance.kubevirt.io \"a\" deleted\n");
  EXPECT_FALSE(Alive(pids.at("a"))) << "QEMU of a still runs";
  EXPECT_FALSE(run_dir_of(uid_a));
  RunResult gone = Kubectl({"get", "vmi", "a"});
  EXPECT_THAT(gone.err, HasSubstr("\"a\" not found"));
  // regdisk delete waits the same way.
  RunResult ours = RunRegdisk({"delete", "--socket", P("api.sock"), "vmi", "c"});
  ASSERT_EQ(ours.exit_code, 0) << ours.err;
  EXPECT_EQ(ours.out, "virtualmachineinstance.kubevirt.io \"c\" deleted\n");
  EXPECT_FALSE(Alive(pids.at("c"))) << "QEMU of c still runs";
  EXPECT_THAT(Kubectl({"get", "vmi", "c"}).err, HasSubstr("\"c\" not found"));

  // A user's finalizer: QEMU stops and ours comes off, the VMI stays,
  // listed with its deletionTimestamp, until the user removes theirs.
  RunResult nowait = Kubectl({"delete", "vmi", "b", "--wait=false"});
  ASSERT_EQ(nowait.exit_code, 0) << nowait.err;
  ASSERT_TRUE(Eventually([&] {
    return !Alive(pids.at("b")) && !run_dir_of(uid_b) &&
           Kubectl({"get", "vmi", "b", "-o", "jsonpath={.metadata.finalizers}"}).out == R"(["example.com/keep"])";
  })) << Kubectl({"get", "vmi", "b", "-o", "yaml"}).out;
  RunResult held = Kubectl({"get", "vmi", "b", "-o", "yaml"});
  EXPECT_THAT(held.out, HasSubstr("  deletionTimestamp: \""));
  EXPECT_THAT(held.out, HasSubstr("  deletionGracePeriodSeconds: 0\n"));
  EXPECT_THAT(Kubectl({"get", "vmis", "-o", "name"}).out, HasSubstr("virtualmachineinstance.kubevirt.io/b\n"));
  // Not started again, and no new finalizer may be added.
  RunResult late = Kubectl({"patch", "vmi", "b", "--type", "merge", "-p",
                            R"({"metadata":{"finalizers":["example.com/keep","example.com/late"]}})"});
  EXPECT_NE(late.exit_code, 0);
  EXPECT_THAT(late.err, HasSubstr("metadata.finalizers: Forbidden: no new finalizers can be added if the object is being "
                                  "deleted, found new finalizers []string{\"example.com/late\"}"));
  RunResult patched = Kubectl({"patch", "vmi", "b", "--type", "json", "-p", R"([{"op":"remove","path":"/metadata/finalizers"}])"});
  EXPECT_EQ(patched.exit_code, 0) << patched.err;
  EXPECT_THAT(Kubectl({"get", "vmi", "b"}).err, HasSubstr("\"b\" not found"));
  EXPECT_EQ(Qemus(), 0);
}

TEST_F(NodeE2eTest, ADaemonKilledWhileAVmiStopsFinishesTheDeletionAfterARestart) {
  ASSERT_OK(WriteFileAtomic(P("c.yaml"), HaltVmi("c", image_)));
  ASSERT_EQ(Kubectl({"apply", "-f", P("c.yaml")}).exit_code, 0);
  ASSERT_TRUE(Eventually([&] { return Running() == 1 && Pids().size() == 1; })) << Kubectl({"get", "vmis", "-o", "yaml"}).out;
  const int pid = Pids().at("c");
  ASSERT_EQ(Kubectl({"delete", "vmi", "c", "--wait=false"}).exit_code, 0);
  // kill -9 once the daemon has begun the stop (its log line, written as
  // the stop starts; a hang guard only): the guest ignores ACPI powerdown,
  // and with the daemon gone nothing ends the QEMU it was stopping.
  ASSERT_TRUE(Eventually([&] {
    return ReadFileCapped(log_, 1 << 20).value_or("").find("stopping VMI default/c ") != std::string::npos;
  })) << ReadFileCapped(log_, 1 << 20).value_or("");
  server_->Signal(SIGKILL);
  server_->Wait(std::chrono::seconds(10));
  server_.reset();
  port_ = 0;
  {
    auto store = state::ObjectStore::Open(tmp() / "root" / "state.db");
    ASSERT_OK(store);
    auto vmi = (*store)->Get("kubevirt.io/v1/virtualmachineinstances", "default", "c");
    ASSERT_OK(vmi);
    EXPECT_TRUE((*vmi)["metadata"].contains("deletionTimestamp"));
    EXPECT_EQ((*vmi)["metadata"]["finalizers"], json({"kubevirt.io/foregroundDeleteVirtualMachine"}));
  }
  ASSERT_TRUE(Alive(pid)) << "the QEMU stopped before the daemon was killed";
  // The next daemon adopts the QEMU, sees the deletion and finishes it.
  StartServer();
  EXPECT_TRUE(Eventually([&] {
    return !Alive(pid) && fs::is_empty(tmp() / "root" / "run") &&
           Kubectl({"get", "vmis", "-o", "name"}).out.empty();
  })) << Kubectl({"get", "vmis", "-o", "yaml"}).out;
}

// --- The client commands (regdisk apply/get/delete/scale/logs/console/port)
// against the same server, their output held against kubectl's.

// A table with its AGE cells ("9s", "2m5s") as "<age>" and its columns
// joined by one space: an age that ticks over between the two calls (and
// the column width that may follow from it) is not a difference.
std::string WithoutAges(const std::string& out) {
  if (out.rfind("NAME", 0) != 0) return out;
  static const std::regex kAge("^([0-9]+[smhd])+$");
  std::string norm;
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream cells(line);
    std::string cell, joined;
    while (cells >> cell) joined += (joined.empty() ? "" : " ") + (std::regex_match(cell, kAge) ? "<age>" : cell);
    norm += joined + "\n";
  }
  return norm;
}

class ClientTest : public KubectlApiTest {
 protected:
  RunResult Client(std::vector<std::string> args, std::string_view input = {}) {
    args.insert(args.begin() + 1, {"--socket", P("api.sock")});
    return RunRegdisk(args, input);
  }
  // Runs both; tables are compared without their ages (WithoutAges).
  std::pair<RunResult, RunResult> Both(const std::vector<std::string>& args) {
    std::pair<RunResult, RunResult> r = {Client(args), Kubectl(args)};
    r.first.out = WithoutAges(r.first.out);
    r.second.out = WithoutAges(r.second.out);
    return r;
  }
};

TEST_F(ClientTest, ApplyGetScaleAndDeletePrintWhatKubectlPrints) {
  ASSERT_OK(WriteFileAtomic(P("rs.yaml"), kReplicaSet));
  RunResult apply = Client({"apply", "-f", P("rs.yaml")});
  ASSERT_EQ(apply.exit_code, 0) << apply.err;
  EXPECT_EQ(apply.out, "virtualmachineinstancereplicaset.kubevirt.io/web created\n");
  EXPECT_EQ(Client({"apply", "-f", P("rs.yaml")}).out, "virtualmachineinstancereplicaset.kubevirt.io/web unchanged\n");
  // regdisk keeps kubectl's last-applied configuration: kubectl sees no change.
  RunResult kubectl_again = Kubectl({"apply", "-f", P("rs.yaml")});
  EXPECT_EQ(kubectl_again.out, "virtualmachineinstancereplicaset.kubevirt.io/web unchanged\n") << kubectl_again.err;
  std::string changed = kReplicaSet;
  changed.replace(changed.find("replicas: 3"), 11, "replicas: 2");
  RunResult configured = Client({"apply", "-f", "-"}, changed);
  EXPECT_EQ(configured.out, "virtualmachineinstancereplicaset.kubevirt.io/web configured\n") << configured.err;
  EXPECT_EQ(Replicas(), "2");
  // Several documents: each object on its own line.
  RunResult two = Client({"apply", "-f", "-"}, "apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\nstringData:\n  "
                                               "userdata: x\n---\n" + changed);
  EXPECT_EQ(two.out, "secret/creds created\nvirtualmachineinstancereplicaset.kubevirt.io/web unchanged\n") << two.err;

  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("standalone")).code, 201);
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"get", "vmirs"}, {"get", "vmirss", "-o", "wide"}, {"get", "vmis"}, {"get", "vmi", "-o", "wide"},
           {"get", "virtualmachineinstance", "standalone"}, {"get", "vmis", "-o", "name"},
           {"get", "vmirs", "web", "-o", "name"}, {"get", "vmis", "-l", "app=web", "-o", "name"}}) {
    auto [ours, theirs] = Both(args);
    EXPECT_EQ(ours.exit_code, 0) << ours.err;
    EXPECT_EQ(ours.out, theirs.out) << ::testing::PrintToString(args);
  }
  auto [ours_json, theirs_json] = Both({"get", "vmirs", "web", "-o", "json"});
  EXPECT_EQ(json::parse(ours_json.out), json::parse(theirs_json.out));
  auto [ours_list, theirs_list] = Both({"get", "vmis", "-o", "json"});
  EXPECT_EQ(json::parse(ours_list.out)["items"], json::parse(theirs_list.out)["items"]);
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"get", "vmirs", "web", "-o", "yaml"}, {"get", "vmis", "-o", "yaml"}}) {
    auto [ours, theirs] = Both(args);
    EXPECT_EQ(ours.out, theirs.out) << ::testing::PrintToString(args);
  }

  RunResult scale = Client({"scale", "vmirs", "web", "--replicas", "5"});
  EXPECT_EQ(scale.exit_code, 0) << scale.err;
  EXPECT_EQ(scale.out, "virtualmachineinstancereplicaset.kubevirt.io/web scaled\n");
  EXPECT_EQ(Replicas(), "5");
  // get -w: the list, then each change.
  Process::Options wopt;
  wopt.stdout_mode = Process::Stdio::kFile;
  wopt.stdout_file = P("watch.out");
  auto watch = Process::Spawn({REGDISK_BIN, "get", "vmirs", "-w", "-o", "name", "--socket", P("api.sock")}, wopt);
  ASSERT_OK(watch);
  auto lines = [&] {
    std::string w = ReadFileCapped(P("watch.out"), 1 << 20).value_or("");
    return std::count(w.begin(), w.end(), '\n');
  };
  for (int i = 0; i < 300 && lines() < 1; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(Client({"scale", "vmirs", "web", "--replicas", "6"}).exit_code, 0);
  for (int i = 0; i < 300 && lines() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  watch->Terminate(std::chrono::seconds(5));
  EXPECT_EQ(ReadFileCapped(P("watch.out"), 1 << 20).value_or(""),
            "virtualmachineinstancereplicaset.kubevirt.io/web\nvirtualmachineinstancereplicaset.kubevirt.io/web\n");

  RunResult del = Client({"delete", "-f", P("rs.yaml")});
  EXPECT_EQ(del.exit_code, 0) << del.err;
  EXPECT_EQ(del.out, "virtualmachineinstancereplicaset.kubevirt.io \"web\" deleted\n");
  RunResult del2 = Client({"delete", "vmi", "standalone"});
  EXPECT_EQ(del2.out, "virtualmachineinstance.kubevirt.io \"standalone\" deleted\n") << del2.err;
  RunResult none = Client({"get", "vmis"});
  EXPECT_EQ(none.exit_code, 0);
  EXPECT_EQ(none.out, "");
  EXPECT_EQ(none.err, "No resources found in default namespace.\n");
  RunResult gone = Client({"get", "vmirs", "web"});
  EXPECT_EQ(gone.exit_code, 1);
  EXPECT_EQ(gone.err,
            "regdisk: error: Error from server (NotFound): virtualmachineinstancereplicasets.kubevirt.io \"web\" not "
            "found\n");
  // A VMI without a QEMU (serve --api-only) has no log and no console.
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("idle")).code, 201);
  RunResult logs = Client({"logs", "idle"});
  EXPECT_EQ(logs.exit_code, 1);
  EXPECT_THAT(logs.err, HasSubstr("Error from server (BadRequest): VirtualMachineInstance \"idle\" has no console log yet"));
  RunResult console = Client({"console", "idle"});
  EXPECT_EQ(console.exit_code, 1);
  EXPECT_THAT(console.err, HasSubstr("because phase is Pending instead of Running"));
}

TEST_F(ClientTest, AnUnreachableDaemonAndBadUsageAreOneLineErrors) {
  RunResult missing = RunRegdisk({"get", "vmis", "--socket", P("nothing.sock")});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_EQ(missing.err, "regdisk: error: cannot reach the regdisk daemon at " + P("nothing.sock") +
                             ": No such file or directory; start it with regdisk serve or set --socket/REGDISK_SOCKET\n");
  RunResult env = RunRegdisk({"logs", "x"}, {}, {"REGDISK_SOCKET=" + P("nothing.sock")});
  EXPECT_EQ(env.exit_code, 1);
  EXPECT_THAT(env.err, HasSubstr("cannot reach the regdisk daemon at " + P("nothing.sock")));
  // A socket file nobody listens on refuses.
  {
    UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, P("dead.sock").c_str());
    ASSERT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  }
  RunResult refused = RunRegdisk({"apply", "-f", "-", "--socket", P("dead.sock")}, kReplicaSet);
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_THAT(refused.err, HasSubstr(": Connection refused; start it with regdisk serve"));

  EXPECT_EQ(Client({"get"}).exit_code, 2);
  EXPECT_EQ(Client({"scale", "vmirs", "web"}).exit_code, 2);
  EXPECT_EQ(Client({"get", "vmis", "-o", "table"}).exit_code, 2);
  RunResult kind = Client({"get", "pods"});
  EXPECT_EQ(kind.exit_code, 2);
  EXPECT_THAT(kind.err, HasSubstr("the server doesn't have a resource type \"pods\""));
  RunResult file = Client({"apply", "-f", P("absent.yaml")});
  EXPECT_EQ(file.exit_code, 2);
  EXPECT_EQ(Client({"delete", "vmis"}).exit_code, 2);
}

TEST_F(ClientTest, AKubeconfigTakesTheClientCommandsToTheTlsEndpoint) {
  ASSERT_OK(WriteFileAtomic(P("rs.yaml"), kReplicaSet));
  const std::vector<std::string> tls = {"--kubeconfig", P("root/kubeconfig")};
  auto over_tls = [&](std::vector<std::string> args, std::string_view input = {}) {
    args.insert(args.end(), tls.begin(), tls.end());
    return RunRegdisk(args, input);
  };
  RunResult apply = over_tls({"apply", "-f", P("rs.yaml")});
  ASSERT_EQ(apply.exit_code, 0) << apply.err;
  EXPECT_EQ(apply.out, "virtualmachineinstancereplicaset.kubevirt.io/web created\n");
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("standalone")).code, 201);
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"get", "vmirs"}, {"get", "vmis", "-o", "name"}, {"get", "vmi", "standalone", "-o", "yaml"}}) {
    RunResult ours = over_tls(args);
    RunResult theirs = Kubectl(args);
    EXPECT_EQ(ours.exit_code, 0) << ours.err;
    EXPECT_EQ(WithoutAges(ours.out), WithoutAges(theirs.out)) << ::testing::PrintToString(args);
  }
  EXPECT_EQ(over_tls({"scale", "vmirs", "web", "--replicas", "4"}).out,
            "virtualmachineinstancereplicaset.kubevirt.io/web scaled\n");
  EXPECT_EQ(Replicas(), "4");
  // REGDISK_KUBECONFIG alone is enough; --socket (or REGDISK_SOCKET) wins
  // over it. KUBECONFIG, which names kubectl's cluster, is never read.
  const std::string env = "REGDISK_KUBECONFIG=" + P("root/kubeconfig");
  RunResult via_env = RunRegdisk({"get", "vmi", "standalone", "-o", "name"}, {}, {env});
  EXPECT_EQ(via_env.out, "virtualmachineinstance.kubevirt.io/standalone\n") << via_env.err;
  RunResult not_kubectls = RunRegdisk({"get", "vmi", "standalone", "-o", "name"}, {}, {"KUBECONFIG=" + P("root/kubeconfig")});
  EXPECT_EQ(not_kubectls.exit_code, 1) << not_kubectls.out;
  EXPECT_THAT(not_kubectls.err, HasSubstr("cannot reach the regdisk daemon at /run/regdisk/regdisk.sock"));
  RunResult socket_wins = RunRegdisk({"get", "vmis", "--socket", P("nothing.sock")}, {}, {env});
  EXPECT_EQ(socket_wins.exit_code, 1);
  EXPECT_THAT(socket_wins.err, HasSubstr("cannot reach the regdisk daemon at " + P("nothing.sock")));
  // A wrong token is the server's 401; an unreadable kubeconfig is bad input.
  std::string config = ReadFileCapped(P("root/kubeconfig"), 1 << 20).value();
  config.replace(config.find(token_), token_.size(), std::string(token_.size(), '0'));
  ASSERT_OK(WriteFileAtomic(P("wrong-token"), config));
  RunResult refused = RunRegdisk({"get", "vmis", "--kubeconfig", P("wrong-token")});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_EQ(refused.err, "regdisk: error: Error from server (Unauthorized): Unauthorized\n");
  EXPECT_THAT(refused.err, Not(HasSubstr(token_)));
  RunResult missing = RunRegdisk({"get", "vmis", "--kubeconfig", P("absent")});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_EQ(missing.err, "regdisk: error: cannot read the kubeconfig: opening " + P("absent") +
                             ": No such file or directory\n");
  // The console needs the socket.
  RunResult console = over_tls({"console", "standalone"});
  EXPECT_EQ(console.exit_code, 1);
  EXPECT_THAT(console.err, HasSubstr("a console goes over the daemon's unix socket only"));
  RunResult del = over_tls({"delete", "-f", P("rs.yaml")});
  EXPECT_EQ(del.out, "virtualmachineinstancereplicaset.kubevirt.io \"web\" deleted\n") << del.err;
}

TEST_F(ClientTest, AllNamespacesAndFieldSelectorsPrintWhatKubectlPrints) {
  ASSERT_EQ(Socket("POST", "/api/v1/namespaces", R"({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"other"}})")
                .code,
            201);
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("a")).code, 201);
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("b")).code, 201);
  ASSERT_EQ(Socket("POST", "/apis/kubevirt.io/v1/namespaces/other/virtualmachineinstances", VmiJson("c")).code, 201);
  HttpResult running = Socket("PATCH", std::string(kVmisPath) + "/a/status", R"({"status":{"phase":"Running"}})",
                              "application/merge-patch+json");
  ASSERT_EQ(running.code, 200) << running.body;
  // The cluster-wide list path kubectl get -A uses.
  HttpResult all = Socket("GET", "/apis/kubevirt.io/v1/virtualmachineinstances");
  ASSERT_EQ(all.code, 200) << all.body;
  EXPECT_EQ(all.Json()["items"].size(), 3u);

  RunResult table = Client({"get", "vmis", "-A"});
  EXPECT_EQ(table.exit_code, 0) << table.err;
  EXPECT_EQ(table.out.substr(0, table.out.find('\n')).substr(0, 15), "NAMESPACE   NAM") << table.out;
  EXPECT_THAT(table.out, HasSubstr("\nother       c "));
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"get", "vmis", "-A"},
           {"get", "vmis", "--all-namespaces", "-o", "wide"},
           {"get", "vmis", "-A", "-o", "name"},
           {"get", "vmis", "--field-selector", "metadata.name=a"},
           {"get", "vmis", "--field-selector", "metadata.name!=a", "-o", "name"},
           {"get", "vmis", "-A", "--field-selector", "metadata.namespace=other"},
           {"get", "vmis", "-A", "--field-selector", "status.phase=Running", "-o", "name"},
           {"get", "vmis", "--field-selector", "status.phase!=Running,metadata.name!=zzz", "-o", "name"},
           {"get", "vmis", "--field-selector", "metadata.name=zzz"},
           {"get", "vmis", "-A", "--field-selector", "metadata.name=zzz"}}) {
    auto [ours, theirs] = Both(args);
    EXPECT_EQ(ours.exit_code, 0) << ours.err;
    EXPECT_EQ(ours.out, theirs.out) << ::testing::PrintToString(args);
    EXPECT_EQ(ours.err, theirs.err) << ::testing::PrintToString(args);
  }
  EXPECT_EQ(Client({"get", "vmis", "-A", "--field-selector", "status.phase=Running", "-o", "name"}).out,
            "virtualmachineinstance.kubevirt.io/a\n");
  // A field the server does not index: Kubernetes' 400, through both clients.
  HttpResult bad = Socket("GET", std::string(kVmisPath) + "?fieldSelector=spec.running%3Dtrue");
  EXPECT_EQ(bad.code, 400);
  EXPECT_EQ(bad.Json()["reason"], "BadRequest");
  EXPECT_EQ(bad.Json()["message"], "field label not supported: spec.running");
  EXPECT_EQ(Socket("GET", std::string(kVmirsPath) + "?fieldSelector=status.phase%3DRunning").code, 400);
  // A lone '!' is no operator: refused, never read as '=' (its opposite).
  for (const char* sel : {"status.phase%21Running", "status.phase%21%3D%3DRunning", "status.phase%3D%3D%3DRunning"}) {
    HttpResult loose = Socket("GET", std::string(kVmisPath) + "?fieldSelector=" + sel);
    EXPECT_EQ(loose.code, 400) << sel << ": " << loose.body;
  }
  RunResult ours = Client({"get", "vmis", "--field-selector", "spec.running=true"});
  EXPECT_EQ(ours.exit_code, 1);
  EXPECT_EQ(ours.err, "regdisk: error: Error from server (BadRequest): field label not supported: spec.running\n");
  RunResult theirs = Kubectl({"get", "vmis", "--field-selector", "spec.running=true"});
  EXPECT_NE(theirs.exit_code, 0);
  EXPECT_THAT(theirs.err, HasSubstr("field label not supported: spec.running"));
  RunResult named = Client({"get", "vmis", "a", "-A"});
  EXPECT_EQ(named.exit_code, 2);
  EXPECT_THAT(named.err, HasSubstr("cannot be retrieved by name across all namespaces"));
}

// --- serve --auth cert -------------------------------------------------------

class CertAuthTest : public KubectlApiTest {
 protected:
  void SetUp() override {
    serve_args_ = {"--api-only", "--auth", "cert"};
    KubectlApiTest::SetUp();
  }
};

TEST_F(CertAuthTest, KubectlAndRegdiskGetInWithTheClientCertificateAndNothingElseDoes) {
  EXPECT_EQ(Mode(P("root/kubeconfig")), 0600u);
  const std::string kubeconfig = ReadFileCapped(P("root/kubeconfig"), 1 << 20).value();
  EXPECT_THAT(kubeconfig, HasSubstr("\n    client-certificate-data: "));
  EXPECT_THAT(kubeconfig, HasSubstr("\n    client-key-data: "));
  EXPECT_THAT(kubeconfig, Not(HasSubstr("token")));
  ASSERT_EQ(Socket("POST", kVmisPath, VmiJson("a")).code, 201);
  RunResult kubectl = Kubectl({"get", "vmis", "-o", "name"});
  EXPECT_EQ(kubectl.exit_code, 0) << kubectl.err;
  EXPECT_EQ(kubectl.out, "virtualmachineinstance.kubevirt.io/a\n");
  RunResult ours = RunRegdisk({"get", "vmis", "-o", "name", "--kubeconfig", P("root/kubeconfig")});
  EXPECT_EQ(ours.exit_code, 0) << ours.err;
  EXPECT_EQ(ours.out, kubectl.out);

  CallOptions o = Tls(kVmisPath);
  EXPECT_EQ(Call(o).code, 401);  // no credential
  o.token = token_;
  EXPECT_EQ(Call(o).code, 401);  // the token is not taken with --auth cert
  o.token.clear();
  o.cert_file = P("root/api/client.crt");
  o.key_file = P("root/api/client.key");
  HttpResult ok = Call(o);
  EXPECT_EQ(ok.code, 200) << ok.body;
  // The server's certificate, from the same CA, is not a client's.
  o.cert_file = P("root/api/tls.crt");
  o.key_file = P("root/api/tls.key");
  EXPECT_EQ(Call(o).code, 401);
  // A client certificate from another CA (another root's) is refused.
  auto other = api::LoadOrCreateCredentials(P("other"), "127.0.0.1");
  ASSERT_OK(other);
  o.cert_file = P("other/client.crt");
  o.key_file = P("other/client.key");
  HttpResult foreign = Call(o);
  EXPECT_EQ(foreign.code, 401) << curl_easy_strerror(foreign.curl);
  EXPECT_EQ(foreign.Json()["reason"], "Unauthorized");
  // ... by kubectl and regdisk too, with a kubeconfig that trusts this server.
  api::Credentials forged = *other;
  forged.ca_cert_pem = ReadFileCapped(P("root/api/ca.crt"), 1 << 20).value();
  ASSERT_OK(api::WriteKubeconfig(P("forged"), "https://127.0.0.1:" + std::to_string(port_), forged,
                                 api::AuthMode::kClientCert));
  RunResult kubectl_refused = RunProgram({kKubectl, "--cache-dir", P("home/cache"), "get", "vmis"}, {},
                                         {"KUBECONFIG=" + P("forged"), "HOME=" + P("home")}, std::chrono::seconds(60));
  EXPECT_NE(kubectl_refused.exit_code, 0);
  EXPECT_THAT(kubectl_refused.err, HasSubstr("Unauthorized"));
  RunResult ours_refused = RunRegdisk({"get", "vmis", "--kubeconfig", P("forged")});
  EXPECT_EQ(ours_refused.exit_code, 1);
  EXPECT_EQ(ours_refused.err, "regdisk: error: Error from server (Unauthorized): Unauthorized\n");
}

// The client commands against a daemon that runs VMs: logs, console and
// port go through the API (subresources.kubevirt.io/v1), not the run
// directory; the client is given a --root of its own to prove it.
class ClientNodeTest : public NodeE2eTest {
 protected:
  RunResult Client(std::vector<std::string> args, std::string_view input = {}) {
    args.insert(args.begin(), {"--root", P("client-root")});
    args.insert(args.begin() + 3, {"--socket", P("api.sock")});
    return RunRegdisk(args, input);
  }
};

TEST_F(ClientNodeTest, LogsConsoleAndPortOfARunningVmi) {
  ASSERT_OK(WriteFileAtomic(P("vmi.yaml"), R"(apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: solo
spec:
  domain:
    devices:
      disks:
      - name: root
        disk:
          bus: virtio
      interfaces:
      - name: default
        masquerade: {}
        ports:
        - port: 80
    resources:
      requests:
        memory: 64M
  networks:
  - name: default
    pod: {}
  volumes:
  - name: root
    containerDisk:
      image: )" + image_ + "\n"));
  RunResult apply = Client({"apply", "-f", P("vmi.yaml")});
  ASSERT_EQ(apply.exit_code, 0) << apply.err;
  EXPECT_EQ(apply.out, "virtualmachineinstance.kubevirt.io/solo created\n");
  ASSERT_TRUE(Eventually([&] { return Running() == 1; })) << Kubectl({"get", "vmis", "-o", "yaml"}).out;
  ASSERT_TRUE(Eventually([&] {
    return Client({"logs", "solo"}).out.find("PRISTINE-SECTOR-CONTENT") != std::string::npos;
  })) << Client({"logs", "solo"}).err;

  // The published port: in the VMI's annotation, and from regdisk port.
  json vmi = json::parse(Kubectl({"get", "vmi", "solo", "-o", "json"}).out);
  json ports = json::parse(vmi["metadata"]["annotations"]["regdisk.io/published-ports"].get<std::string>());
  ASSERT_EQ(ports.size(), 1u);
  const std::string host = ports[0]["hostIP"].get<std::string>() + ":" + std::to_string(ports[0]["hostPort"].get<int>());
  EXPECT_EQ(ports[0]["port"], 80);
  RunResult port = Client({"port", "solo"});
  EXPECT_EQ(port.exit_code, 0) << port.err;
  EXPECT_EQ(port.out, "80/tcp -> " + host + "\n");
  EXPECT_EQ(Client({"port", "solo", "80"}).out, host + "\n");
  EXPECT_EQ(Client({"port", "solo", "81"}).exit_code, 1);
  RunResult unknown = Client({"port", "nobody"});
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_THAT(unknown.err, HasSubstr("Error from server (NotFound): virtualmachineinstances.kubevirt.io \"nobody\" not found"));

  // The table as kubectl prints it, with a Running VMI.
  RunResult ours = Client({"get", "vmis", "-o", "wide"});
  RunResult theirs = Kubectl({"get", "vmis", "-o", "wide"});
  EXPECT_EQ(WithoutAges(ours.out), WithoutAges(theirs.out));
  EXPECT_THAT(ours.out, HasSubstr("Running"));

  // The console: attached on a terminal, Ctrl-] detaches. (This guest
  // only prints at boot and then halts, so no bytes come back.)
  auto session = PtySession::Spawn({REGDISK_BIN, "--root", P("client-root"), "console", "solo", "--socket", P("api.sock")});
  ASSERT_OK(session);
  ASSERT_TRUE((*session)->ReadUntil("The escape sequence is ^]", 0, std::chrono::seconds(30))) << (*session)->seen();
  ASSERT_OK((*session)->Write("hello\x1d"));
  int status = (*session)->Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status << (*session)->seen();

  // logs -f follows until the VMI is deleted.
  Process::Options o;
  o.stdout_mode = Process::Stdio::kFile;
  o.stdout_file = P("follow.out");
  auto follow = Process::Spawn({REGDISK_BIN, "logs", "-f", "solo", "--socket", P("api.sock")}, o);
  ASSERT_OK(follow);
  ASSERT_TRUE(Eventually([&] {
    return ReadFileCapped(P("follow.out"), 1 << 20).value_or("").find("PRISTINE-SECTOR-CONTENT") != std::string::npos;
  }));
  EXPECT_FALSE(follow->Wait(std::chrono::milliseconds(500)).has_value());  // still following
  RunResult del = Client({"delete", "vmi", "solo"});
  EXPECT_EQ(del.out, "virtualmachineinstance.kubevirt.io \"solo\" deleted\n") << del.err;
  std::optional<int> ended = follow->Wait(std::chrono::seconds(60));
  ASSERT_TRUE(ended.has_value());
  EXPECT_EQ(*ended, 0);
}

}  // namespace
}  // namespace regdisk::testing
