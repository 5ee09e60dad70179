// Command gocaller polls a gRPC unary method the way a router written in Go
// would, for `loadsvc bench grpc`: -callers callers, each on its own connection
// (as separate routers would be), each calling every -period, their first calls
// spread evenly over one period. Calls in the first -warmup are not counted.
//
// Requests and responses are raw bytes (no generated code): the request is
// -request-hex (default: an empty GetLoadsRequest, i.e. every rank) and the last
// response is returned for the caller to decode and check. Output, on stdout,
// one JSON object: {"latencies_ns": [...], "errors": n, "error_sample": "...",
// "last": base64}. It builds against Debian's packaged grpc-go in GOPATH mode
// (golang-go, golang-google-grpc-dev); loadsvc/bench/grpc.py runs the build.
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sync"
	"time"

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

type result struct {
	LatenciesNs []int64 `json:"latencies_ns"`
	Errors      int     `json:"errors"`
	ErrorSample string  `json:"error_sample"`
	Last        []byte  `json:"last"`
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "gocaller: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "server address host:port")
	method := flag.String("method", "/loadsvc.v1.LoadService/GetLoads", "full method name")
	requestHex := flag.String("request-hex", "", "serialized request message, hex (default: empty message)")
	callers := flag.Int("callers", 32, "concurrent callers, one connection each")
	period := flag.Duration("period", 50*time.Millisecond, "time between two calls of one caller")
	duration := flag.Duration("duration", 10*time.Second, "measured time, after the warm-up")
	warmup := flag.Duration("warmup", time.Second, "time whose calls are not counted")
	timeout := flag.Duration("timeout", 5*time.Second, "deadline of one call")
	flag.Parse()
	if *callers < 1 || *period <= 0 || *duration <= 0 || *warmup < 0 {
		fail("-callers must be >= 1, -period and -duration > 0, -warmup >= 0")
	}
	request, err := hex.DecodeString(*requestHex)
	if err != nil {
		fail("-request-hex: %v", err)
	}

	conns := make([]*grpc.ClientConn, *callers)
	for i := range conns {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		conns[i], err = grpc.DialContext(ctx, *target, grpc.WithInsecure(), grpc.WithBlock(),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
		cancel()
		if err != nil {
			fail("connect %s: %v", *target, err)
		}
		defer conns[i].Close()
	}

	start := time.Now()
	measureFrom := start.Add(*warmup)
	end := measureFrom.Add(*duration)
	latencies := make([][]int64, *callers)
	errors := make([]int, *callers)
	samples := make([]string, *callers)
	lasts := make([][]byte, *callers)
	var wg sync.WaitGroup
	for k := 0; k < *callers; k++ {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			tick := start.Add(time.Duration(int64(*period) * int64(k) / int64(*callers)))
			var response []byte
			for {
				tick = tick.Add(*period)
				if wait := time.Until(tick); wait > 0 {
					time.Sleep(wait)
				}
				t0 := time.Now()
				if !t0.Before(end) {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), *timeout)
				err := conns[k].Invoke(ctx, *method, &request, &response)
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

	var out result
	out.LatenciesNs = []int64{}
	for k := 0; k < *callers; k++ {
		out.LatenciesNs = append(out.LatenciesNs, latencies[k]...)
		out.Errors += errors[k]
		if samples[k] != "" {
			out.ErrorSample = samples[k]
		}
		if lasts[k] != nil {
			out.Last = lasts[k]
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("write result: %v", err)
	}
}
