// Disk validation against images made by qemu-img itself.
#include "disk/format.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "harness/harness.h"

namespace regdisk::disk {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

class DiskFormatTest : public testing::TempDirTest {
 protected:
  std::string Path(const std::string& name) { return P(name); }
  void QemuImg(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"qemu-img"};
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = testing::RunProgram(argv);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  Result<DiskInfo> Inspect(const std::string& name) {
    auto fd = OpenFile(Path(name), O_RDONLY);
    if (!fd.ok()) return fd.status();
    uint64_t size = fs::file_size(Path(name));
    return InspectDisk(fd->get(), 0, size, "/disk/" + name);
  }
  void Patch(const std::string& name, uint64_t offset, std::string_view bytes) {
    auto fd = OpenFile(Path(name), O_WRONLY);
    ASSERT_TRUE(fd.ok());
    ASSERT_EQ(::pwrite(fd->get(), bytes.data(), bytes.size(), static_cast<off_t>(offset)), static_cast<ssize_t>(bytes.size()));
  }
};

TEST_F(DiskFormatTest, AcceptsQcow2V2V3AndRaw) {
  QemuImg({"create", "-q", "-f", "qcow2", "-o", "compat=0.10", Path("v2.qcow2"), "64M"});
  QemuImg({"create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=4096", Path("v3.qcow2"), "1G"});
  QemuImg({"create", "-q", "-f", "raw", Path("disk.raw"), "3M"});
  auto v2 = Inspect("v2.qcow2");
  ASSERT_OK(v2);
  EXPECT_EQ(v2->format, Format::kQcow2);
  EXPECT_EQ(v2->qcow2_version, 2);
  EXPECT_EQ(v2->virtual_size, 64u << 20);
  auto v3 = Inspect("v3.qcow2");
  ASSERT_OK(v3);
  EXPECT_EQ(v3->qcow2_version, 3);
  EXPECT_EQ(v3->cluster_bits, 12);
  EXPECT_EQ(v3->virtual_size, 1u << 30);
  auto raw = Inspect("disk.raw");
  ASSERT_OK(raw);
  EXPECT_EQ(raw->format, Format::kRaw);
  EXPECT_EQ(raw->virtual_size, 3u << 20);
}

TEST_F(DiskFormatTest, RefusesDangerousQcow2) {
  QemuImg({"create", "-q", "-f", "raw", Path("host-file"), "1M"});
  QemuImg({"create", "-q", "-f", "qcow2", "-b", Path("host-file"), "-F", "raw", Path("backed.qcow2")});
  EXPECT_THAT(Inspect("backed.qcow2").status().message(), HasSubstr("/disk/backed.qcow2 has a backing file"));

  QemuImg({"create", "-q", "-f", "qcow2", "-o", "data_file=" + Path("data.raw"), Path("external.qcow2"), "1M"});
  EXPECT_THAT(Inspect("external.qcow2").status().message(), HasSubstr("external data file"));

  QemuImg({"create", "-q", "-f", "qcow2", Path("corrupt.qcow2"), "1M"});
  Patch("corrupt.qcow2", 72 + 7, "\x02");  // incompatible_features: corrupt bit
  EXPECT_THAT(Inspect("corrupt.qcow2").status().message(), HasSubstr("marked corrupt"));

  QemuImg({"create", "-q", "-f", "qcow2", Path("future.qcow2"), "1M"});
  Patch("future.qcow2", 72 + 7, std::string_view("\x80", 1));  // bit 7: unknown
  EXPECT_THAT(Inspect("future.qcow2").status().message(), HasSubstr("incompatible qcow2 features regdisk does not know (bits 0x80)"));

  QemuImg({"create", "-q", "-f", "qcow2", Path("encrypted.qcow2"), "1M"});
  Patch("encrypted.qcow2", 32 + 3, "\x02");  // crypt_method: LUKS
  EXPECT_THAT(Inspect("encrypted.qcow2").status().message(), HasSubstr("is encrypted"));

  QemuImg({"create", "-q", "-f", "qcow2", Path("bigcluster.qcow2"), "1M"});
  Patch("bigcluster.qcow2", 20 + 3, "\x1e");  // cluster_bits 30
  EXPECT_THAT(Inspect("bigcluster.qcow2").status().message(), HasSubstr("cluster_bits 30 is outside 9..21"));

  QemuImg({"create", "-q", "-f", "qcow2", Path("l1.qcow2"), "1M"});
  Patch("l1.qcow2", 40, std::string("\x00\x00\x00\x10\x00\x00\x00\x00", 8));  // L1 far beyond the end
  EXPECT_THAT(Inspect("l1.qcow2").status().message(), HasSubstr("the L1 table lies beyond the end of the file"));

  QemuImg({"create", "-q", "-f", "qcow2", Path("truncated.qcow2"), "1M"});
  ASSERT_EQ(::truncate(Path("truncated.qcow2").c_str(), 40), 0);
  EXPECT_THAT(Inspect("truncated.qcow2").status().message(), HasSubstr("the header is truncated"));
}

TEST_F(DiskFormatTest, NamesForeignFormatsAndHowToConvert) {
  QemuImg({"create", "-q", "-f", "raw", Path("src.raw"), "1M"});
  for (const char* fmt : {"vmdk", "vhdx", "vdi", "vpc", "qed"}) {
    std::string name = std::string("disk.") + fmt;
    QemuImg({"convert", "-q", "-f", "raw", "-O", fmt, Path("src.raw"), Path(name)});
    auto r = Inspect(name);
    ASSERT_FALSE(r.ok()) << fmt;
    EXPECT_THAT(r.status().message(), HasSubstr("convert it with: qemu-img convert -f " + std::string(fmt) +
                                                    " -O qcow2 " + name + " disk.qcow2"))
        << fmt;
  }
  EXPECT_THAT(Inspect("disk.vmdk").status().message(), HasSubstr("is in VMDK format"));
  ASSERT_OK(WriteFileAtomic(Path("empty.img"), ""));
  EXPECT_THAT(Inspect("empty.img").status().message(), HasSubstr("is empty"));
}

}  // namespace
}  // namespace regdisk::disk
