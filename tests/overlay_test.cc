// Ephemeral disks written by regdisk, checked by QEMU's own tools.
#include "disk/overlay.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "harness/harness.h"

namespace regdisk::disk {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

class OverlayTest : public testing::TempDirTest {
 protected:
  testing::RunResult Qemu(const std::vector<std::string>& argv) {
    auto r = testing::RunProgram(argv);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r;
  }
};

TEST_F(OverlayTest, QemuAcceptsItOverQcow2AndRawAndWritesStayInIt) {
  for (const std::string fmt : {"qcow2", "raw"}) {
    SCOPED_TRACE(fmt);
    const std::string base = P("base." + fmt), overlay = P("vm-" + fmt + ".qcow2");
    Qemu({"qemu-img", "create", "-q", "-f", fmt, base, "3G"});  // an L1 table of 6 entries
    Qemu({"qemu-io", "-f", fmt, "-c", "write -P 0x5a 1M 128k", base});
    ASSERT_OK(CreateOverlay(overlay, base, fmt == "raw" ? Format::kRaw : Format::kQcow2, 3ull << 30));

    Qemu({"qemu-img", "check", "-q", "-f", "qcow2", overlay});
    json info = json::parse(Qemu({"qemu-img", "info", "--output=json", "-f", "qcow2", overlay}).out);
    EXPECT_EQ(info["virtual-size"], 3ull << 30);
    EXPECT_EQ(info["backing-filename"], base);
    EXPECT_EQ(info["backing-filename-format"], fmt);
    EXPECT_EQ(info["format-specific"]["data"]["compat"], "1.1");
    // It reads as the base, and a write lands in the overlay only.
    Qemu({"qemu-img", "compare", "-q", "-f", "qcow2", "-F", fmt, overlay, base});
    Qemu({"qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 1M 4k", overlay});
    Qemu({"qemu-img", "check", "-q", "-f", "qcow2", overlay});
    EXPECT_NE(testing::RunProgram({"qemu-img", "compare", "-q", "-f", "qcow2", "-F", fmt, overlay, base}).exit_code, 0);
    Qemu({"qemu-io", "-f", fmt, "-c", "read -P 0x5a 1M 128k", base});

    struct stat st;
    ASSERT_EQ(::stat(overlay.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
  }
}

TEST_F(OverlayTest, AFreshOverlayTakesAFewBlocks) {
  const std::string base = P("base.raw");
  Qemu({"qemu-img", "create", "-q", "-f", "raw", base, "20G"});
  ASSERT_OK(CreateOverlay(P("vm.qcow2"), base, Format::kRaw, 20ull << 30));
  struct stat st;
  ASSERT_EQ(::stat(P("vm.qcow2").c_str(), &st), 0);
  EXPECT_LE(st.st_blocks * 512, 64 * 1024);  // the L1 table is a hole
  Qemu({"qemu-img", "check", "-q", "-f", "qcow2", P("vm.qcow2")});
}

TEST_F(OverlayTest, SmallAndOddSizesMatchQemuImg) {
  const std::string base = P("base.raw");
  Qemu({"qemu-img", "create", "-q", "-f", "raw", base, "1536"});
  ASSERT_OK(CreateOverlay(P("small.qcow2"), base, Format::kRaw, 1536));
  Qemu({"qemu-img", "check", "-q", "-f", "qcow2", P("small.qcow2")});
  Qemu({"qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", P("small.qcow2"), base});
}

TEST_F(OverlayTest, RefusesWhatItCannotWrite) {
  EXPECT_THAT(CreateOverlay(P("a.qcow2"), "relative/disk.img", Format::kRaw, 1 << 20).message(),
              HasSubstr("must be absolute"));
  EXPECT_THAT(CreateOverlay(P("b.qcow2"), "/" + std::string(1100, 'x'), Format::kRaw, 1 << 20).message(),
              HasSubstr("at most 1023 bytes"));
  EXPECT_THAT(CreateOverlay(P("c.qcow2"), P("base"), Format::kRaw, 1000).message(), HasSubstr("multiple of 512"));
  ASSERT_OK(WriteFileAtomic(P("exists.qcow2"), "x", 0600));
  EXPECT_FALSE(CreateOverlay(P("exists.qcow2"), P("base"), Format::kRaw, 1 << 20).ok());
  EXPECT_EQ(ReadFileCapped(P("exists.qcow2"), 10).value(), "x");  // left alone
}

}  // namespace
}  // namespace regdisk::disk
