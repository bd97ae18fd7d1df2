// The C++ floor: bench/floor.py's ADS server, in C++ gRPC, serving the same pre-serialised bytes.
//
// bench/floor.py writes the responses (its _content(), byte for byte) into a directory and
// starts this binary on it; see bench/floor.py and docs/benchmarks.md. The protocol is the
// grpcio floor's: a request without a response_nonce gets the one EDS response if it asks for
// EDS and the one CDS response otherwise; ACKs get nothing; on SIGUSR1 every open stream gets
// one new EDS response, push k (from 1) being "version push-k, push body k % 2, nonce push-k".
// Nothing is parsed but a request's type_url and response_nonce (a walk over the wire format);
// Envoy's protos are not compiled in. A generic callback service (gRPC's own threads) holds
// the streams; the main thread waits for signals.
//
//     floor-server --port 18100 --content DIR --eds-type-url URL
//
// DIR holds cds.bin, eds.bin, push-0.bin and push-1.bin. "ready PORT cds=NB eds=NB" on
// stdout, as the grpcio floor prints, once it listens.

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <pthread.h>

#include <chrono>
#include <csignal>
#include <cstdint>
#include <deque>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace {

constexpr char kAdsMethod[] = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

// --------------------------------------------------------------------------- wire format

bool ReadVarint(const std::string& buf, size_t* pos, uint64_t* value) {
  *value = 0;
  for (int shift = 0; shift < 64 && *pos < buf.size(); shift += 7) {
    const auto byte = static_cast<uint8_t>(buf[(*pos)++]);
    *value |= static_cast<uint64_t>(byte & 0x7F) << shift;
    if (byte < 0x80) return true;
  }
  return false;
}

void WriteVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

// A length-delimited field, as bench/loadgen.py's _ld writes it.
std::string LengthDelimited(int number, const std::string& payload) {
  std::string out;
  WriteVarint(static_cast<uint64_t>(number) << 3 | 2, &out);
  WriteVarint(payload.size(), &out);
  return out + payload;
}

// DiscoveryRequest.type_url (field 4) and whether response_nonce (field 5) is set; false if malformed.
bool ParseRequest(const grpc::ByteBuffer& buffer, std::string* type_url, bool* has_nonce) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) return false;
  std::string buf;
  for (const auto& s : slices) buf.append(reinterpret_cast<const char*>(s.begin()), s.size());
  type_url->clear();
  *has_nonce = false;
  size_t pos = 0;
  while (pos < buf.size()) {
    uint64_t key, n;
    if (!ReadVarint(buf, &pos, &key)) return false;
    switch (key & 7) {
      case 0:
        if (!ReadVarint(buf, &pos, &n)) return false;
        break;
      case 1:
        pos += 8;
        break;
      case 5:
        pos += 4;
        break;
      case 2:
        if (!ReadVarint(buf, &pos, &n) || n > buf.size() - pos) return false;
        if (key >> 3 == 4) *type_url = buf.substr(pos, n);
        if (key >> 3 == 5) *has_nonce = n > 0;
        pos += n;
        break;
      default:
        return false;
    }
  }
  return pos == buf.size();
}

grpc::ByteBuffer Buffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);  // copies of a ByteBuffer share this slice
}

// --------------------------------------------------------------------------- the content

struct Content {
  std::string eds_type_url;
  grpc::ByteBuffer cds, eds;
  std::string push_bodies[2];  // every field of a push but its version and nonce
};

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

// --------------------------------------------------------------------------- the streams

class Stream;

// The open streams, so that a push reaches every one.
class Streams {
 public:
  void Add(Stream* stream) {
    std::lock_guard<std::mutex> lock(mu_);
    open_.insert(stream);
  }
  void Remove(Stream* stream) {
    std::lock_guard<std::mutex> lock(mu_);
    open_.erase(stream);
  }
  void Push(const grpc::ByteBuffer& message);  // held under mu_: a stream is not deleted meanwhile

 private:
  std::mutex mu_;
  std::set<Stream*> open_;
};

// One StreamAggregatedResources call. gRPC allows one write in flight per stream, so messages
// wait in a queue, as the grpcio floor's do; the call ends, after the queue is written, once
// the client stops sending (or at once if a write fails).
class Stream final : public grpc::ServerGenericBidiReactor {
 public:
  Stream(const Content& content, Streams& streams) : content_(content), streams_(streams) {
    streams_.Add(this);
    StartRead(&request_);
  }

  // Any thread: queue a message, and write it now if no write is in flight.
  void Send(const grpc::ByteBuffer& message) {
    const grpc::ByteBuffer* next;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (reads_done_ || finished_) return;  // the grpcio floor's writer has stopped by then too
      queue_.push_back(message);
      if (writing_) return;
      writing_ = true;
      next = &queue_.front();  // a deque's elements stay put while others are appended
    }
    StartWrite(next);
  }

  void OnReadDone(bool ok) override {
    std::string type_url;
    bool has_nonce;
    if (!ok) return EndReads(grpc::Status::OK);
    if (!ParseRequest(request_, &type_url, &has_nonce)) {
      return EndReads(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "malformed DiscoveryRequest"));
    }
    if (!has_nonce) Send(type_url == content_.eds_type_url ? content_.eds : content_.cds);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
    }
    StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    const grpc::ByteBuffer* next = nullptr;
    bool finish = false;
    grpc::Status status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.pop_front();
      status = status_;
      if (ok && !queue_.empty()) {
        next = &queue_.front();
      } else {
        writing_ = false;
        if (!ok) queue_.clear();
        finish = (!ok || reads_done_) && !finished_;
        finished_ = finished_ || finish;
      }
    }
    if (next != nullptr) {
      StartWrite(next);
    } else if (finish) {
      Finish(status);  // last: OnDone (which deletes this) may follow at once
    }
  }

  void OnDone() override {
    streams_.Remove(this);
    delete this;
  }

 private:
  // The client half-closed or went away (or sent garbage): finish once the queue is written.
  void EndReads(const grpc::Status& status) {
    bool finish;
    {
      std::lock_guard<std::mutex> lock(mu_);
      status_ = status;
      reads_done_ = true;
      finish = !writing_ && !finished_;
      finished_ = finished_ || finish;
    }
    if (finish) Finish(status);
  }

  const Content& content_;
  Streams& streams_;
  grpc::ByteBuffer request_;
  grpc::Status status_;  // what Finish will say, once the reads are done
  std::mutex mu_;
  std::deque<grpc::ByteBuffer> queue_;
  bool writing_ = false, reads_done_ = false, finished_ = false;
};

void Streams::Push(const grpc::ByteBuffer& message) {
  std::lock_guard<std::mutex> lock(mu_);
  for (Stream* stream : open_) stream->Send(message);
}

class Unimplemented final : public grpc::ServerGenericBidiReactor {
 public:
  Unimplemented() { Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "")); }
  void OnDone() override { delete this; }
};

class AdsService final : public grpc::CallbackGenericService {
 public:
  AdsService(const Content& content, Streams& streams) : content_(content), streams_(streams) {}

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* context) override {
    if (context->method() != kAdsMethod) return new Unimplemented;
    return new Stream(content_, streams_);
  }

 private:
  const Content& content_;
  Streams& streams_;
};

int Usage() {
  std::cerr << "usage: floor-server --port PORT --content DIR --eds-type-url URL" << std::endl;
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string port, dir;
  Content content;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--port") {
      port = argv[i + 1];
    } else if (flag == "--content") {
      dir = argv[i + 1];
    } else if (flag == "--eds-type-url") {
      content.eds_type_url = argv[i + 1];
    } else {
      return Usage();
    }
  }
  if (argc % 2 != 1 || port.empty() || dir.empty() || content.eds_type_url.empty()) return Usage();
  std::string cds, eds;
  if (!ReadFile(dir + "/cds.bin", &cds) || !ReadFile(dir + "/eds.bin", &eds) ||
      !ReadFile(dir + "/push-0.bin", &content.push_bodies[0]) ||
      !ReadFile(dir + "/push-1.bin", &content.push_bodies[1])) {
    std::cout << "cannot read the content in " << dir << std::endl;
    return 1;
  }
  content.cds = Buffer(cds);
  content.eds = Buffer(eds);

  // Blocked before gRPC starts its threads (they inherit the mask): only sigwait below sees them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGUSR1);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  Streams streams;
  AdsService service(content, streams);
  grpc::ServerBuilder builder;
  int bound = 0;
  builder.AddListeningPort("127.0.0.1:" + port, grpc::InsecureServerCredentials(), &bound);
  builder.SetMaxReceiveMessageSize(-1);
  // gRPC 1.51 has no limit on calls not yet picked up (grpcio's floor lifts its own): nothing to set.
  builder.RegisterCallbackGenericService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound == 0) {
    std::cout << "cannot listen on 127.0.0.1:" << port << std::endl;
    return 1;
  }
  std::cout << "ready " << bound << " cds=" << cds.size() << "B eds=" << eds.size() << "B" << std::endl;

  for (uint64_t k = 1;;) {
    int signal = 0;
    if (sigwait(&signals, &signal) != 0 || signal != SIGUSR1) break;
    const std::string tag = "push-" + std::to_string(k);
    streams.Push(Buffer(LengthDelimited(1, tag) + content.push_bodies[k % 2] + LengthDelimited(5, tag)));
    ++k;
  }
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  return 0;
}
