// copy, pull, images, rmi, prune, inspect, build and base.
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "cli/go_template.h"
#include "image/build.h"
#include "image/chunked_build.h"
#include "image/copy.h"
#include "image/transport.h"
#include "store/lazy_dir.h"
#include "store/peek.h"
#include "store/store.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::cli {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

int RunCopy(const Globals& g, const std::string& from, const std::string& to, bool all) {
  auto opts = MakeClientOptions(g);
  if (!opts.ok()) return Fail(opts.status());
  auto platform = oci::Platform::Parse(g.platform);
  if (!platform.ok()) return Fail(platform.status());
  auto src_name = image::ImageName::Parse(from);
  if (!src_name.ok()) return Fail(src_name.status());
  auto dst_name = image::ImageName::Parse(to);
  if (!dst_name.ok()) return Fail(dst_name.status());
  auto src = image::OpenSource(*src_name, *opts);
  if (!src.ok()) return Fail(src.status());
  // A layout this copy creates is removed again if the copy fails.
  std::error_code ec;
  bool new_layout = dst_name->transport == image::ImageName::Transport::kOciLayout &&
                    !std::filesystem::exists(dst_name->dir, ec);
  auto discard = [&] {
    if (new_layout) std::filesystem::remove_all(dst_name->dir, ec);
  };
  auto dst = image::OpenDestination(*dst_name, *opts);
  if (!dst.ok()) {
    discard();
    return Fail(dst.status());
  }
  image::CopyOptions copts;
  copts.platform = *platform;
  copts.all = all;
  copts.on_progress = TerminalProgress(g.quiet);
  auto r = image::Copy(**src, **dst, copts);
  if (!r.ok()) {
    discard();
    return Fail(r.status().Annotate("copying " + src_name->String() + " to " + dst_name->String()));
  }
  std::printf("%s\n", r->digest.str().c_str());
  log::Info("copied {} blobs ({} bytes), {} already present", r->blobs_copied, r->bytes_copied, r->blobs_present);
  return 0;
}

namespace {

// Pulls `ref` into the node store under --root.
Result<store::StoredImage> PullToStore(const Globals& g, const std::string& ref, const std::string& path) {
  ASSIGN_OR_RETURN(registry::ClientOptions opts, MakeClientOptions(g));
  ASSIGN_OR_RETURN(oci::Platform platform, oci::Platform::Parse(g.platform));
  ASSIGN_OR_RETURN(std::vector<image::ImageName> candidates, image::CandidateNames(ref, opts.registries.get()));
  ASSIGN_OR_RETURN(store::Store st, store::Store::Open(g.root));
  store::PullOptions po;
  po.platform = platform;
  po.path = path;
  po.on_progress = TerminalProgress(g.quiet);
  ASSIGN_OR_RETURN(po.limits, MakeDiskLimits(g));
  po.cancel = g.cancel;
  // A short name's candidates in order, as podman tries them: the first
  // that pulls is the name the store records.
  std::string tried;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const image::ImageName& name = candidates[i];
    if (candidates.size() > 1) log::Info("short name {}: trying {}", ref, name.String());
    auto img = [&]() -> Result<store::StoredImage> {
      ASSIGN_OR_RETURN(std::unique_ptr<image::ImageSource> src, image::OpenSource(name, opts));
      return st.Pull(*src, name.String(), po);
    }();
    if (img.ok()) return img;
    Status failed = std::move(img).status().Annotate("pulling " + name.String());
    if (candidates.size() == 1 || failed.code() == Code::kCancelled) return failed;
    tried += (tried.empty() ? "" : "; ") + failed.message();
    if (i + 1 == candidates.size()) {
      return Status(failed.code(), "short name " + Printable(ref, 200) + " matched no image in the unqualified-search "
                                   "registries: " + tried);
    }
  }
  return Internal("no candidate names for " + Printable(ref, 200));
}

// Prints JSON as skopeo and podman do (four spaces).
void PrintJson(const ojson& j) { std::printf("%s\n", j.dump(4).c_str()); }

// Runs a --format template over each value, one line each.
int PrintTemplate(const std::string& format, const std::vector<ojson>& values) {
  auto t = GoTemplate::Parse(format);
  if (!t.ok()) return Fail(t.status());
  std::string out;
  for (const auto& v : values) {
    auto line = t->Execute(v);
    if (!line.ok()) return Fail(line.status());
    out += *line;
    if (out.empty() || out.back() != '\n') out += '\n';
  }
  std::fputs(out.c_str(), stdout);
  return 0;
}

// --- images -------------------------------------------------------------------

// "2 hours ago", as podman (docker/go-units HumanDuration) writes it.
std::string HumanAgo(int64_t seconds) {
  if (seconds < 1) return "Less than a second ago";
  if (seconds == 1) return "1 second ago";
  if (seconds < 60) return fmt::format("{} seconds ago", seconds);
  const int64_t minutes = seconds / 60;
  if (minutes == 1) return "About a minute ago";
  if (minutes < 60) return fmt::format("{} minutes ago", minutes);
  const int64_t hours = (seconds + 1800) / 3600;
  if (hours == 1) return "About an hour ago";
  if (hours < 48) return fmt::format("{} hours ago", hours);
  if (hours < 24 * 7 * 2) return fmt::format("{} days ago", hours / 24);
  if (hours < 24 * 30 * 2) return fmt::format("{} weeks ago", hours / 24 / 7);
  if (hours < 24 * 365 * 2) return fmt::format("{} months ago", hours / 24 / 30);
  return fmt::format("{} years ago", seconds / 3600 / 24 / 365);
}

// Seconds since the epoch of an RFC 3339 time ("2024-05-01T10:00:00.5Z",
// "...+02:00"); nullopt when it is not one.
std::optional<int64_t> ParseRfc3339(const std::string& s) {
  struct tm tm {};
  const char* rest = ::strptime(s.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
  if (rest == nullptr) return std::nullopt;
  if (*rest == '.') {
    ++rest;
    while (*rest >= '0' && *rest <= '9') ++rest;
  }
  int64_t offset = 0;
  if (*rest == '+' || *rest == '-') {
    int h = 0, m = 0;
    if (std::sscanf(rest + 1, "%2d:%2d", &h, &m) != 2) return std::nullopt;
    offset = (*rest == '+' ? 1 : -1) * (h * 3600 + m * 60);
  } else if (*rest != 'Z' && *rest != 'z') {
    return std::nullopt;
  }
  return static_cast<int64_t>(::timegm(&tm)) - offset;
}

// Sizes as podman's images prints them: SI units, three significant
// digits ("1.23 GB", "626 MB", "512 B").
std::string HumanSize(uint64_t bytes) {
  static const char* const kUnits[] = {"B", "kB", "MB", "GB", "TB", "PB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1000 && u < 5) {
    v /= 1000;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g %s", v, kUnits[u]);
  return buf;
}

// The image ID podman shows: the config digest (the manifest digest for an
// image whose config is not in the store), 12 hex digits.
std::string FullId(const store::StoredImage& img) {
  return (img.config_digest ? *img.config_digest : img.manifest_digest).str();
}
std::string ShortId(const store::StoredImage& img) {
  return (img.config_digest ? *img.config_digest : img.manifest_digest).hex().substr(0, 12);
}

// REPOSITORY and TAG of a stored name: "127.0.0.1:5000/vm/f25" and
// "latest"; "<none>" when pulled by digest only.
std::pair<std::string, std::string> RepoAndTag(const std::string& name) {
  auto n = image::ImageName::Parse(name);
  if (!n.ok()) return {name, "<none>"};
  if (n->transport == image::ImageName::Transport::kOciLayout) {
    return {"oci:" + n->dir.string(), n->tag.empty() ? "<none>" : n->tag};
  }
  return {n->ref.registry + "/" + n->ref.repository, n->ref.tag.empty() ? "<none>" : n->ref.tag};
}

ojson ImageRow(const store::StoredImage& img, int64_t now) {
  auto [repo, tag] = RepoAndTag(img.name);
  auto created = ParseRfc3339(img.created);
  return {{"Repository", repo},
          {"Tag", tag},
          {"ID", ShortId(img)},
          {"Digest", img.manifest_digest.str()},
          {"Created", created ? HumanAgo(now - *created) : "unknown"},
          {"CreatedAt", img.created},
          {"Size", HumanSize(img.disk.file_size)},
          {"VirtualSize", HumanSize(img.disk.virtual_size)},
          {"Format", std::string(disk::FormatName(img.disk.format))},
          {"Platform", img.platform},
          {"Name", img.name},
          {"DiskPath", img.disk_path}};
}

// A disk still filling (lazy boot): its image's name, and in FORMAT how
// much has arrived ("filling 37%"); no ID or digest yet (the ID column
// shows its layer's first 12 hex digits, in parentheses).
ojson FillingRow(const store::FillingDisk& d, int64_t now) {
  const store::LazyRecord& rec = *d.record;
  auto [repo, tag] = RepoAndTag(rec.image);
  auto created = ParseRfc3339(rec.created);
  return {{"Repository", repo},
          {"Tag", tag},
          {"ID", "(" + rec.layer.hex().substr(0, 12) + ")"},
          {"Digest", "<filling>"},
          {"Created", created ? HumanAgo(now - *created) : "unknown"},
          {"CreatedAt", rec.created},
          {"Size", HumanSize(d.bytes)},
          {"VirtualSize", HumanSize(rec.disk_size)},
          {"Format", fmt::format("filling {}%", d.Percent())},
          {"Platform", ""},
          {"Name", rec.image},
          {"DiskPath", rec.image_path}};
}

json FillingJson(const store::FillingDisk& d) {
  const store::LazyRecord& rec = *d.record;
  return {{"name", rec.image},
          {"layer", rec.layer.str()},
          {"created", rec.created},
          {"filling",
           {{"present", d.present}, {"chunks", d.chunks}, {"percent", d.Percent()}, {"served", d.in_use}}},
          {"disk",
           {{"path", rec.image_path},
            {"format", "raw"},
            {"virtualSize", rec.disk_size},
            {"size", d.bytes},
            {"file", (d.dir / "disk.raw").string()}}}};
}

// Columns padded to their widest cell, two spaces apart (podman's tabwriter).
void PrintTable(const std::vector<std::vector<std::string>>& rows, bool heading) {
  if (rows.empty()) return;
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& r : rows) {
    for (size_t i = 0; i < r.size(); ++i) width[i] = std::max(width[i], r[i].size());
  }
  for (size_t k = heading ? 0 : 1; k < rows.size(); ++k) {
    std::string line;
    for (size_t i = 0; i < rows[k].size(); ++i) {
      line += rows[k][i];
      if (i + 1 < rows[k].size()) line += std::string(width[i] - rows[k][i].size() + 2, ' ');
    }
    std::printf("%s\n", line.c_str());
  }
}

}  // namespace

int RunPull(const Globals& g, const std::string& ref, const std::string& path) {
  auto img = PullToStore(g, ref, path);
  if (!img.ok()) return Fail(img.status());
  std::printf("%s\n", img->manifest_digest.str().c_str());
  log::Info("{}: {} disk {} ({} bytes virtual)", img->name, disk::FormatName(img->disk.format), img->disk_path,
            img->disk.virtual_size);
  return 0;
}

int RunImages(const Globals& g, const ImagesFlags& f) {
  if (f.output != "text" && f.output != "json") return Fail(InvalidArgument("-o takes text or json, not \"" + f.output + "\""));
  if (f.output == "json" && (!f.format.empty() || f.quiet)) {
    return Fail(InvalidArgument("-o json cannot be combined with --format or -q; choose one"));
  }
  std::optional<GoTemplate> tmpl;
  if (!f.format.empty()) {
    auto t = GoTemplate::Parse(f.format);
    if (!t.ok()) return Fail(t.status());
    tmpl = std::move(*t);
  }
  // Reading only: a store that is not there is an empty one, and stays absent.
  const store::Store st = store::Store::OpenForReading(g.root);
  auto list = st.List();
  if (!list.ok()) return Fail(list.status());
  // Disks still filling (lazy boot) whose record names their image.
  auto filling = st.Filling();
  if (!filling.ok()) return Fail(filling.status());
  if (f.output == "json") {
    json out = json::array();
    for (const auto& img : *list) out.push_back(img.ToJson());
    for (const auto& d : *filling) out.push_back(FillingJson(d));
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  const int64_t now = static_cast<int64_t>(::time(nullptr));
  if (f.quiet) {
    // IDs only: a filling disk has none yet.
    std::set<std::string> seen;
    for (const auto& img : *list) {
      if (seen.insert(ShortId(img)).second) std::printf("%s\n", ShortId(img).c_str());
    }
    return 0;
  }
  std::vector<ojson> rows_in;
  for (const auto& img : *list) rows_in.push_back(ImageRow(img, now));
  for (const auto& d : *filling) rows_in.push_back(FillingRow(d, now));
  if (tmpl) {
    std::string out;
    for (const auto& row : rows_in) {
      auto line = tmpl->Execute(row);
      if (!line.ok()) return Fail(line.status());
      out += *line;
      if (out.empty() || out.back() != '\n') out += '\n';
    }
    std::fputs(out.c_str(), stdout);
    return 0;
  }
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> head = {"REPOSITORY", "TAG"};
  if (f.digests) head.push_back("DIGEST");
  for (const char* h : {"IMAGE ID", "CREATED", "SIZE", "FORMAT", "VIRTUAL SIZE"}) head.push_back(h);
  rows.push_back(head);
  for (const ojson& r : rows_in) {
    std::vector<std::string> row = {PrintableLine(r["Repository"].get<std::string>(), 200),
                                    PrintableLine(r["Tag"].get<std::string>(), 128)};
    if (f.digests) row.push_back(r["Digest"]);
    for (const char* k : {"ID", "Created", "Size", "Format", "VirtualSize"}) row.push_back(r[k]);
    rows.push_back(std::move(row));
  }
  PrintTable(rows, !f.no_heading);
  return 0;
}

namespace {

// What one rmi argument names: the images of that name (every platform),
// or those whose ID (config digest) starts with it. An ID prefix that fits
// several images is refused, listing them.
Result<std::vector<store::StoredImage>> Match(const std::string& arg, const std::vector<store::StoredImage>& all) {
  std::vector<store::StoredImage> out;
  if (auto name = image::ImageName::Parse(arg); name.ok()) {
    for (const auto& img : all) {
      if (img.name == name->String()) out.push_back(img);
    }
    if (!out.empty()) return out;
  }
  std::string prefix = arg.rfind("sha256:", 0) == 0 ? arg.substr(7) : arg;
  const bool hex = !prefix.empty() && prefix.size() <= 64 &&
                   prefix.find_first_not_of("0123456789abcdef") == std::string::npos;
  if (hex) {
    std::map<std::string, std::vector<std::string>> ids;  // full ID -> names
    for (const auto& img : all) {
      const std::string id = FullId(img).substr(7);
      if (id.compare(0, prefix.size(), prefix) != 0) continue;
      out.push_back(img);
      ids[id].push_back(img.name);
    }
    if (ids.size() > 1) {
      std::string list;
      for (const auto& [id, names] : ids) {
        list += (list.empty() ? "" : ", ") + id.substr(0, 12) + " (" + Printable(names[0], 100) + ")";
      }
      return InvalidArgument("the ID prefix " + prefix + " matches " + std::to_string(ids.size()) + " images: " + list +
                             "; give more of the ID or a name");
    }
    if (!out.empty()) return out;
  }
  return NotFound("the node store has no image named or with the ID " + Printable(arg, 200) +
                  "; regdisk images lists them");
}

void PrintGc(const store::GcResult& r) {
  for (const auto& d : r.disks_in_use) {
    std::fprintf(stderr, "regdisk: kept disk %s: a running VM uses it (regdisk prune removes it once the VM stops)\n",
                 d.c_str());
  }
  for (const auto& d : r.lazy_in_use) {
    std::fprintf(stderr, "regdisk: kept lazily-pulled disk lazy/%s: it is served to a running VM\n",
                 PrintableLine(d, 200).c_str());
  }
  for (const auto& d : r.lazy_removed) std::printf("removed lazily-pulled disk lazy/%s\n", PrintableLine(d, 300).c_str());
  std::printf("freed %.1f MiB: %d disks, %d blobs\n", static_cast<double>(r.bytes_freed) / (1 << 20), r.disks_removed,
              r.blobs_removed);
}

}  // namespace

int RunRmi(const Globals& g, const RmiFlags& f) {
  if (f.all == !f.images.empty()) {
    return Fail(InvalidArgument(f.all ? "rmi --all takes no image names" : "rmi needs image names or IDs, or --all"));
  }
  std::error_code ec;
  if (!std::filesystem::exists(g.root, ec)) {  // nothing to remove; create nothing
    if (f.all) return 0;
    return Fail(NotFound("the node store has no image named or with the ID " + Printable(f.images[0], 200) +
                         " (there is no node store at " + g.root + ")"));
  }
  auto st = store::Store::Open(g.root);
  if (!st.ok()) return Fail(st.status());
  auto all = st->List();
  if (!all.ok()) return Fail(all.status());
  std::vector<store::StoredImage> targets;
  std::set<std::pair<std::string, std::string>> seen;  // name, platform
  auto add = [&](const store::StoredImage& img) {
    if (seen.insert({img.name, img.platform}).second) targets.push_back(img);
  };
  if (f.all) {
    for (const auto& img : *all) add(img);
  }
  std::vector<std::string> filling_names;  // names only a filling disk has
  for (const auto& arg : f.images) {
    auto m = Match(arg, *all);
    if (!m.ok() && m.status().code() == Code::kNotFound) {
      auto filling = store::ListFilling(g.root);
      if (!filling.ok()) return Fail(filling.status());
      if (std::any_of(filling->begin(), filling->end(),
                      [&](const store::FillingDisk& d) { return d.record && d.record->image == arg; })) {
        filling_names.push_back(arg);
        continue;
      }
    }
    if (!m.ok()) return Fail(m.status());
    for (const auto& img : *m) add(img);
  }
  // The stored images first: RemoveImages checks all of them before it
  // removes any, so a refusal (a disk in use) leaves everything as it was,
  // fills included.
  auto r = st->RemoveImages(targets, f.force);
  if (!r.ok()) return Fail(r.status());
  store::GcResult filling_gc;
  for (const auto& name : filling_names) {
    auto n = st->RemoveFilling(name, &filling_gc);
    if (!n.ok()) return Fail(n.status());
  }
  r->lazy_removed.insert(r->lazy_removed.begin(), filling_gc.lazy_removed.begin(), filling_gc.lazy_removed.end());
  r->bytes_freed += filling_gc.bytes_freed;
  for (const auto& name : filling_names) std::printf("Untagged: %s (filling)\n", PrintableLine(name).c_str());
  for (const auto& img : targets) {
    std::printf("Untagged: %s%s\n", PrintableLine(img.name).c_str(),
                img.platform.empty() ? "" : (" (" + img.platform + ")").c_str());
  }
  PrintGc(*r);
  return 0;
}

int RunPrune(const Globals& g) {
  std::error_code ec;
  if (!std::filesystem::exists(g.root, ec)) {
    PrintGc({});
    return 0;
  }
  auto st = store::Store::Open(g.root);
  if (!st.ok()) return Fail(st.status());
  auto r = st->Prune();
  if (!r.ok()) return Fail(r.status());
  PrintGc(*r);
  return 0;
}

int RunFsck(const Globals& g, bool repair) {
  std::error_code ec;
  if (!std::filesystem::is_directory(g.root, ec)) {
    return Fail(NotFound("there is no node store at " + g.root + "; name one with --root"));
  }
  auto st = store::Store::Open(g.root);
  if (!st.ok()) return Fail(st.status());
  auto problems = st->Check(repair);
  if (!problems.ok()) return Fail(problems.status());
  int left = 0;
  for (const auto& p : *problems) {
    std::printf("%s: %s\n", p.repaired ? "removed" : "broken", PrintableLine(p.what).c_str());
    left += !p.repaired;
  }
  if (problems->empty()) {
    std::printf("the node store at %s is whole\n", g.root.c_str());
  } else if (left > 0 && !repair) {
    std::fprintf(stderr, "regdisk: error: %d problems in the node store at %s; regdisk fsck --repair removes what is "
                 "broken (pull again afterwards)\n", left, g.root.c_str());
  } else if (left > 0) {
    std::fprintf(stderr, "regdisk: error: %d problems in the node store at %s could not be repaired\n", left, g.root.c_str());
  }
  return left == 0 ? 0 : 1;
}

namespace {

// The Disk object of inspect: from the disk's header (--disk: ranged reads
// of the layer) or, without --disk, from the labels regdisk build sets.
Result<std::optional<ojson>> DiskObject(image::ImageSource& src, const image::Inspection& in, const InspectFlags& f) {
  if (f.disk) {
    ASSIGN_OR_RETURN(store::PeekedDisk d, store::PeekDisk(src, in.image, f.path));
    ojson out = {{"Path", d.image_path},
                 {"Format", std::string(disk::FormatName(d.info.format))},
                 {"VirtualSize", d.info.virtual_size},
                 {"Size", d.info.file_size},
                 {"Layer", d.layer.str()},
                 {"Verified", d.verified},
                 {"From", "header"}};
    if (d.info.format == disk::Format::kQcow2) out["Qcow2Version"] = d.info.qcow2_version;
    return std::optional<ojson>(out);
  }
  const ojson& labels = in.skopeo["Labels"];
  if (!labels.is_object() || !labels.contains("io.regdisk.disk.path")) return std::optional<ojson>();
  auto label = [&](const char* k) { return labels.contains(k) && labels[k].is_string() ? labels[k].get<std::string>() : ""; };
  ojson out = {{"Path", label("io.regdisk.disk.path")}, {"Format", label("io.regdisk.disk.format")}};
  const std::string vs = label("io.regdisk.disk.virtual-size");
  if (!vs.empty() && vs.find_first_not_of("0123456789") == std::string::npos && vs.size() < 20) {
    out["VirtualSize"] = std::stoull(vs);
  }
  out["From"] = "labels";
  return std::optional<ojson>(out);
}

}  // namespace

int RunInspect(const Globals& g, const InspectFlags& f) {
  if (f.raw && (f.disk || !f.format.empty())) {
    return Fail(InvalidArgument("--raw prints the manifest (or with --config the config) as stored; it takes no --disk or --format"));
  }
  if (f.config && f.disk) return Fail(InvalidArgument("--config prints the config blob; it takes no --disk"));
  if (!f.path.empty() && !f.disk) return Fail(InvalidArgument("--path names the disk for --disk; add --disk"));
  std::optional<GoTemplate> tmpl;
  if (!f.format.empty()) {
    auto t = GoTemplate::Parse(f.format);
    if (!t.ok()) return Fail(t.status());
    tmpl = std::move(*t);
  }
  auto opts = MakeClientOptions(g);
  if (!opts.ok()) return Fail(opts.status());
  auto platform = oci::Platform::Parse(g.platform);
  if (!platform.ok()) return Fail(platform.status());
  auto name = image::ImageName::Parse(f.image);
  if (!name.ok()) return Fail(name.status());
  auto src = image::OpenSource(*name, *opts);
  if (!src.ok()) return Fail(src.status());
  const std::string what = "inspecting " + name->String();
  if (f.raw && !f.config) {
    auto m = (*src)->GetManifest();
    if (!m.ok()) return Fail(m.status().Annotate(what));
    std::fwrite(m->bytes.data(), 1, m->bytes.size(), stdout);
    return 0;
  }
  if (f.config) {
    auto img = image::ResolveImage(**src, *platform);
    if (!img.ok()) return Fail(img.status().Annotate(what));
    auto config = image::FetchConfig(**src, *img->manifest.config);
    if (!config.ok()) return Fail(config.status().Annotate(what));
    if (f.raw) {
      std::fwrite(config->data(), 1, config->size(), stdout);
      return 0;
    }
    ojson j = ojson::parse(*config, nullptr, false);
    if (j.is_discarded()) return Fail(DataLoss(what + ": the config blob is not JSON"));
    if (tmpl) return PrintTemplate(f.format, {j});
    PrintJson(j);
    return 0;
  }
  image::InspectOptions io;
  io.platform = *platform;
  io.tags = !f.no_tags;
  auto in = image::Inspect(**src, io);
  if (!in.ok()) return Fail(in.status().Annotate(what));
  auto disk = DiskObject(**src, *in, f);
  if (!disk.ok()) return Fail(disk.status().Annotate(what));
  if (*disk) in->skopeo["Disk"] = **disk;
  if (tmpl) return PrintTemplate(f.format, {in->skopeo});
  PrintJson(in->skopeo);
  return 0;
}

namespace {

Result<image::BuildOptions> MakeBuildOptions(const Globals& g, const BuildFlags& f) {
  image::BuildOptions o;
  o.name = f.name;
  o.compression = !f.compression.empty() ? f.compression : f.format == "docker" ? "gzip" : "zstd";
  o.format = f.format;
  o.layout = f.layout;
  if (f.layout == "chunked") {
    if (f.compression_given && f.compression != "zstd") {
      return InvalidArgument("--layout chunked writes zstd; drop --compression " + f.compression);
    }
    o.compression = "zstd";
    if (!f.chunk_size.empty()) {  // else 0: the default for the disk's size (image::DefaultChunkSize)
      ASSIGN_OR_RETURN(o.chunk_size, image::ParseChunkSize(f.chunk_size));
    }
  } else if (!f.chunk_size.empty()) {
    return InvalidArgument("--chunk-size needs --layout chunked");
  }
  o.on_progress = TerminalProgress(g.quiet);
  ASSIGN_OR_RETURN(o.platform, oci::Platform::Parse(g.platform));
  for (const auto& l : f.labels) {
    size_t eq = l.find('=');
    if (eq == std::string::npos || eq == 0) return InvalidArgument("--label \"" + l + "\" is not of the form KEY=VALUE");
    o.labels[l.substr(0, eq)] = l.substr(eq + 1);
  }
  if (!f.base.empty()) {
    ASSIGN_OR_RETURN(image::ImageName base, image::ImageName::Parse(f.base));
    o.base = base;
  }
  return o;
}

}  // namespace

// build DISK -t DEST, and base -t DEST: prints the manifest digest.
int RunBuild(const Globals& g, const BuildFlags& f, const std::string& disk_file) {
  auto opts = MakeClientOptions(g);
  if (!opts.ok()) return Fail(opts.status());
  auto bo = MakeBuildOptions(g, f);
  if (!bo.ok()) return Fail(bo.status());
  auto dest = image::ImageName::Parse(f.tag);
  if (!dest.ok()) return Fail(dest.status().Annotate("-t"));
  std::error_code ec;
  bool new_layout = dest->transport == image::ImageName::Transport::kOciLayout && !std::filesystem::exists(dest->dir, ec);
  auto r = disk_file.empty() ? image::BuildBaseImage(*dest, *bo, *opts) : image::BuildDiskImage(disk_file, *dest, *bo, *opts);
  if (!r.ok()) {
    if (new_layout) std::filesystem::remove_all(dest->dir, ec);
    return Fail(r.status().Annotate((disk_file.empty() ? "publishing the base image to " : "building " + disk_file + " into ") +
                                    dest->String()));
  }
  std::printf("%s\n", r->manifest.str().c_str());
  log::Info("layer {} ({} bytes)", r->layer.digest.Short(), r->layer.size);
  return 0;
}

}  // namespace regdisk::cli
