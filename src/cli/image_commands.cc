// copy, pull, images, rmi, prune, inspect, build and base.
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "image/build.h"
#include "image/copy.h"
#include "image/transport.h"
#include "store/store.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::cli {

using json = nlohmann::json;

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

// Pulls `ref` into the node store under --root; used by pull and inspect --disk.
Result<store::StoredImage> PullToStore(const Globals& g, const std::string& ref, const std::string& path) {
  ASSIGN_OR_RETURN(registry::ClientOptions opts, MakeClientOptions(g));
  ASSIGN_OR_RETURN(oci::Platform platform, oci::Platform::Parse(g.platform));
  ASSIGN_OR_RETURN(image::ImageName name, image::ImageName::Parse(ref));
  ASSIGN_OR_RETURN(store::Store st, store::Store::Open(g.root));
  ASSIGN_OR_RETURN(std::unique_ptr<image::ImageSource> src, image::OpenSource(name, opts));
  store::PullOptions po;
  po.platform = platform;
  po.path = path;
  po.on_progress = TerminalProgress();
  ASSIGN_OR_RETURN(po.limits, MakeDiskLimits(g));
  po.cancel = g.cancel;
  auto img = st.Pull(*src, name.String(), po);
  if (!img.ok()) return std::move(img).status().Annotate("pulling " + name.String());
  return img;
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

int RunImages(const Globals& g, const std::string& output) {
  auto st = store::Store::Open(g.root);
  if (!st.ok()) return Fail(st.status());
  auto list = st->List();
  if (!list.ok()) return Fail(list.status());
  if (output == "json") {
    json out = json::array();
    for (const auto& img : *list) out.push_back(img.ToJson());
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  if (output != "text") return Fail(InvalidArgument("-o takes text or json, not \"" + output + "\""));
  std::printf("%-60s %-19s %-6s %14s %14s\n", "IMAGE", "DIGEST", "FORMAT", "VIRTUAL SIZE", "SIZE");
  for (const auto& img : *list) {
    std::printf("%-60s %-19s %-6s %14llu %14llu\n", img.name.c_str(), img.manifest_digest.Short().c_str(),
                std::string(disk::FormatName(img.disk.format)).c_str(),
                static_cast<unsigned long long>(img.disk.virtual_size), static_cast<unsigned long long>(img.disk.file_size));
  }
  return 0;
}

// rmi (names given) and prune (none).
int RunRemove(const Globals& g, const std::vector<std::string>& refs, bool prune) {
  auto st = store::Store::Open(g.root);
  if (!st.ok()) return Fail(st.status());
  std::vector<std::string> names;
  for (const auto& ref : refs) {
    auto name = image::ImageName::Parse(ref);
    if (!name.ok()) return Fail(name.status());
    names.push_back(name->String());
  }
  auto r = prune ? st->Prune() : st->Remove(names);
  if (!r.ok()) return Fail(r.status());
  for (const auto& n : names) std::printf("removed %s\n", n.c_str());
  for (const auto& d : r->disks_in_use) {
    std::fprintf(stderr, "regdisk: kept disk %s: a running VM uses it (regdisk prune removes it once the VM stops)\n",
                 d.c_str());
  }
  std::printf("freed %.1f MiB: %d disks, %d blobs\n", static_cast<double>(r->bytes_freed) / (1 << 20), r->disks_removed,
              r->blobs_removed);
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

int RunInspect(const Globals& g, const std::string& ref, bool raw, bool disk, const std::string& path) {
  if (disk) {
    auto img = PullToStore(g, ref, path);
    if (!img.ok()) return Fail(img.status());
    std::printf("%s\n", img->ToJson().dump(2).c_str());
    return 0;
  }
  auto opts = MakeClientOptions(g);
  if (!opts.ok()) return Fail(opts.status());
  auto platform = oci::Platform::Parse(g.platform);
  if (!platform.ok()) return Fail(platform.status());
  auto name = image::ImageName::Parse(ref);
  if (!name.ok()) return Fail(name.status());
  auto src = image::OpenSource(*name, *opts);
  if (!src.ok()) return Fail(src.status());
  if (raw) {
    auto m = (*src)->GetManifest();
    if (!m.ok()) return Fail(m.status().Annotate("inspecting " + name->String()));
    std::fwrite(m->bytes.data(), 1, m->bytes.size(), stdout);
    return 0;
  }
  auto j = image::Inspect(**src, *platform);
  if (!j.ok()) return Fail(j.status().Annotate("inspecting " + name->String()));
  std::printf("%s\n", j->dump(2).c_str());
  return 0;
}

namespace {

Result<image::BuildOptions> MakeBuildOptions(const Globals& g, const BuildFlags& f) {
  image::BuildOptions o;
  o.name = f.name;
  o.compression = !f.compression.empty() ? f.compression : f.format == "docker" ? "gzip" : "zstd";
  o.format = f.format;
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
