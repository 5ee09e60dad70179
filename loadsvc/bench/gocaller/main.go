// Command gocaller calls loadsvc's gRPC methods the way a router written in Go
// would, for `loadsvc bench grpc`. Requests and responses are raw bytes (no
// generated code). It builds against Debian's packaged grpc-go in GOPATH mode
// (golang-go, golang-google-grpc-dev); loadsvc/bench/gocall.py runs the build.
//
// Polling (default): -callers callers, each on its own connection (as separate
// routers would be), each calling -method every -period, their first calls
// spread evenly over one period; calls in the first -warmup are not counted.
// The request is -request-hex (default: an empty GetLoadsRequest, i.e. every
// rank). Output, on stdout, one JSON object:
// {"latencies_ns": [...], "errors": n, "error_sample": "...", "last": base64}.
//
// Watching (-watch N): N WatchLoads streams, -per-conn streams per connection;
// -fields gives the field numbers it reads (see fieldNumbers).
// Once every stream has had its first message it prints "ready" on stdout (or
// exits 2 naming the error when a stream ended before its first message); it
// then reads the final sequence of rank 0 from stdin, waits until every stream
// has seen it (or -settle passes), and prints one JSON object:
// {"latencies_ns": [...], "reached": n, "delivered": n, "errors": n,
// "error_sample": "..."}, where a latency is the receive time of a new rank-0
// sequence minus that snapshot's publish_time_ns (the same clock on one host).
package main

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang/protobuf/proto"
	"google.golang.org/grpc"
)

// rawCodec passes bytes through; it keeps the name "proto" so that the
// content-type is application/grpc+proto, as a generated client sends.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append((*(v.(*[]byte)))[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

// fieldNumbers are the numbers watching reads, given by -fields (gocall.py takes
// them from the generated Python code, so that they are declared in proto/ only):
// GetLoadsResponse.loads and LoadSnapshot.dp_rank, seq and publish_time_ns.
type fieldNumbers struct {
	loads, dpRank, seq, publishTimeNs uint64
}

func parseFields(text string) (fieldNumbers, error) {
	var f fieldNumbers
	if text == "" {
		return f, fmt.Errorf("required: loads=N,dp_rank=N,seq=N,publish_time_ns=N")
	}
	slots := map[string]*uint64{"loads": &f.loads, "dp_rank": &f.dpRank, "seq": &f.seq,
		"publish_time_ns": &f.publishTimeNs}
	for _, item := range strings.Split(text, ",") {
		name, number := item, ""
		if i := strings.IndexByte(item, '='); i >= 0 {
			name, number = item[:i], item[i+1:]
		}
		slot, known := slots[name]
		if !known {
			return f, fmt.Errorf("unknown field %q (want loads, dp_rank, seq, publish_time_ns)", name)
		}
		n, err := strconv.ParseUint(number, 10, 32)
		if err != nil || n == 0 {
			return f, fmt.Errorf("field %s: %q is not a field number", name, number)
		}
		*slot = n
		delete(slots, name)
	}
	if len(slots) > 0 {
		return f, fmt.Errorf("missing field numbers in %q", text)
	}
	return f, nil
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "gocaller: "+format+"\n", args...)
	os.Exit(2)
}

func dial(target string, n int) []*grpc.ClientConn {
	conns := make([]*grpc.ClientConn, n)
	for i := range conns {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		conn, err := grpc.DialContext(ctx, target, grpc.WithInsecure(), grpc.WithBlock(),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
		cancel()
		if err != nil {
			fail("connect %s: %v", target, err)
		}
		conns[i] = conn
	}
	return conns
}

func emit(v interface{}) {
	if err := json.NewEncoder(os.Stdout).Encode(v); err != nil {
		fail("write result: %v", err)
	}
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "server address host:port")
	method := flag.String("method", "/loadsvc.v1.LoadService/GetLoads", "polling: full method name")
	requestHex := flag.String("request-hex", "", "serialized request message, hex (default: empty message)")
	callers := flag.Int("callers", 32, "polling: concurrent callers, one connection each")
	period := flag.Duration("period", 50*time.Millisecond, "polling: time between two calls of one caller")
	duration := flag.Duration("duration", 10*time.Second, "polling: measured time, after the warm-up")
	warmup := flag.Duration("warmup", time.Second, "polling: time whose calls are not counted")
	timeout := flag.Duration("timeout", 5*time.Second, "polling: deadline of one call")
	watchers := flag.Int("watch", 0, "watch with this many WatchLoads streams instead of polling")
	perConn := flag.Int("per-conn", 10, "watching: streams per connection")
	settle := flag.Duration("settle", 5*time.Second, "watching: how long streams get to reach the final sequence")
	fieldsText := flag.String("fields", "", "watching: loads=N,dp_rank=N,seq=N,publish_time_ns=N (field numbers)")
	flag.Parse()
	request, err := hex.DecodeString(*requestHex)
	if err != nil {
		fail("-request-hex: %v", err)
	}
	if *watchers > 0 {
		if *perConn < 1 || *settle < 0 {
			fail("-per-conn must be >= 1, -settle >= 0")
		}
		numbers, err := parseFields(*fieldsText)
		if err != nil {
			fail("-fields: %v", err)
		}
		watch(*target, request, numbers, *watchers, *perConn, *settle)
		return
	}
	if *callers < 1 || *period <= 0 || *duration <= 0 || *warmup < 0 {
		fail("-callers must be >= 1, -period and -duration > 0, -warmup >= 0")
	}
	poll(*target, *method, request, *callers, *period, *duration, *warmup, *timeout)
}

type pollResult struct {
	LatenciesNs []int64 `json:"latencies_ns"`
	Errors      int     `json:"errors"`
	ErrorSample string  `json:"error_sample"`
	Last        []byte  `json:"last"`
}

func poll(target, method string, request []byte, callers int, period, duration, warmup, timeout time.Duration) {
	conns := dial(target, callers)
	start := time.Now()
	measureFrom := start.Add(warmup)
	end := measureFrom.Add(duration)
	latencies := make([][]int64, callers)
	errors := make([]int, callers)
	samples := make([]string, callers)
	lasts := make([][]byte, callers)
	var wg sync.WaitGroup
	for k := 0; k < callers; k++ {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			tick := start.Add(time.Duration(int64(period) * int64(k) / int64(callers)))
			var response []byte
			for {
				tick = tick.Add(period)
				if wait := time.Until(tick); wait > 0 {
					time.Sleep(wait)
				}
				t0 := time.Now()
				if !t0.Before(end) {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), timeout)
				err := conns[k].Invoke(ctx, method, &request, &response)
				t1 := time.Now()
				cancel()
				if err != nil {
					errors[k]++
					samples[k] = err.Error()
					continue
				}
				if !t0.Before(measureFrom) {
					latencies[k] = append(latencies[k], t1.Sub(t0).Nanoseconds())
				}
				lasts[k] = append(lasts[k][:0], response...)
			}
		}(k)
	}
	wg.Wait()
	out := pollResult{LatenciesNs: []int64{}}
	for k := 0; k < callers; k++ {
		out.LatenciesNs = append(out.LatenciesNs, latencies[k]...)
		out.Errors += errors[k]
		if samples[k] != "" {
			out.ErrorSample = samples[k]
		}
		if lasts[k] != nil {
			out.Last = lasts[k]
		}
	}
	for _, c := range conns {
		c.Close()
	}
	emit(out)
}

// fields walks the top-level fields of a serialized message, calling visit with
// each field number, wire type, varint value (wire type 0) and raw bytes (wire
// type 2); proto.DecodeVarint decodes the varints.
func fields(data []byte, visit func(field, wireType, value uint64, raw []byte)) error {
	for len(data) > 0 {
		key, n := proto.DecodeVarint(data)
		if n == 0 {
			return fmt.Errorf("truncated key")
		}
		data = data[n:]
		var value uint64
		var raw []byte
		switch key & 7 {
		case proto.WireVarint:
			value, n = proto.DecodeVarint(data)
			if n == 0 {
				return fmt.Errorf("field %d: truncated varint", key>>3)
			}
		case proto.WireFixed64:
			n = 8
		case proto.WireFixed32:
			n = 4
		case proto.WireBytes:
			length, m := proto.DecodeVarint(data)
			if m == 0 || length > uint64(len(data)-m) {
				return fmt.Errorf("field %d: truncated length-delimited value", key>>3)
			}
			raw, n = data[m:m+int(length)], m+int(length)
		default:
			return fmt.Errorf("field %d: unsupported wire type %d", key>>3, key&7)
		}
		if n > len(data) {
			return fmt.Errorf("field %d: truncated value", key>>3)
		}
		data = data[n:]
		visit(key>>3, key&7, value, raw)
	}
	return nil
}

// rank0 returns (seq, publish_time_ns) of rank 0 in a serialized GetLoadsResponse.
func rank0(data []byte, f fieldNumbers) (uint64, int64, error) {
	found := false
	var seq, published uint64
	var inner error
	err := fields(data, func(field, wireType, _ uint64, raw []byte) {
		if found || inner != nil || field != f.loads || wireType != proto.WireBytes {
			return
		}
		var rank, s, p uint64
		inner = fields(raw, func(field, wireType, value uint64, _ []byte) {
			switch field {
			case f.dpRank:
				rank = value
			case f.seq:
				s = value
			case f.publishTimeNs:
				p = value
			}
		})
		if inner == nil && rank == 0 {
			found, seq, published = true, s, p
		}
	})
	if err == nil {
		err = inner
	}
	if err == nil && !found {
		err = fmt.Errorf("no rank 0 in the response")
	}
	return seq, int64(published), err
}

type watchResult struct {
	LatenciesNs []int64 `json:"latencies_ns"`
	Reached     int     `json:"reached"`
	Delivered   int     `json:"delivered"`
	Errors      int     `json:"errors"`
	ErrorSample string  `json:"error_sample"`
}

func watch(target string, request []byte, numbers fieldNumbers, subscribers, perConn int, settle time.Duration) {
	conns := dial(target, (subscribers+perConn-1)/perConn)
	ctx, cancel := context.WithCancel(context.Background())
	last := make([]uint64, subscribers) // atomic: the latest rank-0 sequence each stream saw
	latencies := make([][]int64, subscribers)
	delivered := make([]int, subscribers)
	var errors, failedBeforeFirst int64
	var sample atomic.Value
	var started sync.WaitGroup
	started.Add(subscribers)
	var wg sync.WaitGroup
	desc := &grpc.StreamDesc{StreamName: "WatchLoads", ServerStreams: true}
	for k := 0; k < subscribers; k++ {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			first := true
			defer func() {
				if first {
					started.Done()
				}
			}()
			stream, err := conns[k%len(conns)].NewStream(ctx, desc, "/loadsvc.v1.LoadService/WatchLoads")
			if err == nil {
				err = stream.SendMsg(&request)
			}
			if err == nil {
				err = stream.CloseSend()
			}
			var message []byte
			for err == nil {
				if err = stream.RecvMsg(&message); err != nil {
					break
				}
				now := time.Now().UnixNano()
				seq, published, perr := rank0(message, numbers)
				if perr != nil {
					err = perr
					break
				}
				if first { // the current state, at once
					first = false
					atomic.StoreUint64(&last[k], seq)
					started.Done()
				} else if seq > atomic.LoadUint64(&last[k]) {
					latencies[k] = append(latencies[k], now-published)
					delivered[k]++
					atomic.StoreUint64(&last[k], seq)
				}
			}
			if ctx.Err() == nil {
				atomic.AddInt64(&errors, 1)
				sample.Store(err.Error())
				if first {
					atomic.AddInt64(&failedBeforeFirst, 1)
				}
			}
		}(k)
	}
	started.Wait()
	if n := atomic.LoadInt64(&failedBeforeFirst); n > 0 {
		fail("%d of %d streams ended before their first message: %v", n, subscribers, sample.Load())
	}
	fmt.Println("ready")
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil && line == "" {
		fail("read the final sequence from stdin: %v", err)
	}
	final, err := strconv.ParseUint(strings.TrimSpace(line), 10, 64)
	if err != nil {
		fail("final sequence %q: %v", line, err)
	}
	reached := func() int {
		n := 0
		for k := range last {
			if atomic.LoadUint64(&last[k]) >= final {
				n++
			}
		}
		return n
	}
	deadline := time.Now().Add(settle)
	for reached() < subscribers && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	out := watchResult{LatenciesNs: []int64{}, Reached: reached()}
	cancel()
	wg.Wait()
	for k := 0; k < subscribers; k++ {
		out.LatenciesNs = append(out.LatenciesNs, latencies[k]...)
		out.Delivered += delivered[k]
	}
	out.Errors = int(atomic.LoadInt64(&errors))
	if s, ok := sample.Load().(string); ok {
		out.ErrorSample = s
	}
	for _, c := range conns {
		c.Close()
	}
	emit(out)
}
