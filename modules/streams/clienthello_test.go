package streams

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// clientHello is the first flight of a crypto/tls client asking for name
// ("" for none).
func clientHello(t testing.TB, name string) []byte {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		c := tls.Client(b, &tls.Config{ServerName: name, InsecureSkipVerify: name == ""})
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_ = c.Handshake()
		b.Close()
	}()
	_ = a.SetReadDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(a, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(a, body); err != nil {
		t.Fatal(err)
	}
	return append(hdr, body...)
}

func TestReadClientHello(t *testing.T) {
	hello := clientHello(t, "DB.Example.com")
	name, read, err := readClientHello(bytes.NewReader(append(hello, "rest"...)))
	if err != nil || name != "db.example.com" || !bytes.Equal(read, hello) {
		t.Fatalf("readClientHello = %q, %d bytes, %v; want db.example.com and the %d bytes of the hello", name, len(read), err, len(hello))
	}
	// The same hello split over two records.
	body := hello[5:]
	split := append([]byte{22, 3, 1, 0, 10}, body[:10]...)
	split = append(split, 22, 3, 1, byte((len(body)-10)>>8), byte(len(body)-10))
	split = append(split, body[10:]...)
	if name, read, err := readClientHello(bytes.NewReader(split)); err != nil || name != "db.example.com" || !bytes.Equal(read, split) {
		t.Errorf("over two records: %q, %d bytes, %v", name, len(read), err)
	}
	if name, _, err := readClientHello(bytes.NewReader(clientHello(t, ""))); err != nil || name != "" {
		t.Errorf("without SNI: %q, %v", name, err)
	}
	if _, read, err := readClientHello(bytes.NewReader([]byte("GET / HTTP/1.1\r\n"))); !errors.Is(err, errNotTLS) || string(read) != "GET /" {
		t.Errorf("plain text: %q, %v; want errNotTLS after the one read of a record header", read, err)
	}
	// A client whose first message is shorter than a record header, and
	// that waits for an answer: told apart at once, not when the read of
	// 5 bytes would time out.
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	go client.Write([]byte("hi\n"))
	_ = server.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, read, err := readClientHello(server); !errors.Is(err, errNotTLS) || string(read) != "hi\n" {
		t.Errorf("3 bytes, then waiting: %q, %v; want errNotTLS with the 3 bytes, at once", read, err)
	}
	// Past the bound: refused after the header.
	big := []byte{22, 3, 1, 0x40, 0x01}
	if _, read, err := readClientHello(bytes.NewReader(append(big, make([]byte, 1<<15)...))); !errors.Is(err, errNotTLS) || len(read) != 5 {
		t.Errorf("a 16 KiB record: %d bytes, %v", len(read), err)
	}
	// Cut short: the bytes read so far.
	if _, read, err := readClientHello(bytes.NewReader(hello[:100])); err == nil || !bytes.Equal(read, hello[:100]) {
		t.Errorf("cut short: %d bytes, %v", len(read), err)
	}
}

// FuzzReadClientHello: any input is read without a panic, never past
// maxHelloBytes, and what it returns as read is a prefix of the input.
func FuzzReadClientHello(f *testing.F) {
	f.Add(clientHello(f, "a.example.com"))
	f.Add(clientHello(f, ""))
	f.Add([]byte{22, 3, 1, 0, 4, 1, 0, 0, 0})
	f.Add([]byte("SSH-2.0-x\r\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		name, read, err := readClientHello(bytes.NewReader(in))
		if !bytes.HasPrefix(in, read) {
			t.Fatalf("read %x is not a prefix of the input", read)
		}
		if len(read) > maxHelloBytes+5 {
			t.Fatalf("read %d bytes", len(read))
		}
		if err != nil && name != "" {
			t.Fatalf("name %q with error %v", name, err)
		}
	})
}
