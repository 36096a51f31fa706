package main

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRefusePasswordFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		bad  string
	}{
		{[]string{"--url", "x", "--password", "secret"}, "password"},
		{[]string{"--password=secret"}, "password"},
		{[]string{"-p", "secret"}, "p"},
		{[]string{"--from-password=s3"}, "from-password"},
		{[]string{"--to-password", "s3"}, "to-password"},
		{[]string{"--url", "--", "--password"}, ""},
		{[]string{"--user", "password"}, ""},
	} {
		err := refusePasswordFlags(tc.args, EnvPassword)
		if tc.bad == "" {
			assert.NoError(t, err, "%v", tc.args)
			continue
		}
		require.ErrorIs(t, err, errUsage, "%v", tc.args)
		assert.Contains(t, err.Error(), "--"+tc.bad+":")
		assert.Contains(t, err.Error(), EnvPassword)
		assert.NotContains(t, err.Error(), "secret", "the value is never echoed")
		assert.NotContains(t, err.Error(), "s3")
	}
}

func writeCreds(t *testing.T, body string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "credentials")
	require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
	require.NoError(t, os.Chmod(p, mode))
	return p
}

func TestCredentialsFile(t *testing.T) {
	body := "# comment\n\nhttps://pool-a.example root  pass with spaces \nhttp://127.0.0.1:8080/ admin s3cret\r\npool-c.example root c-pass\n"
	p := writeCreds(t, body, 0o600)
	for _, tc := range []struct {
		url, user, want string
		found           bool
	}{
		{"https://pool-a.example", "root", "pass with spaces ", true},
		{"https://pool-a.example/", "root", "pass with spaces ", true},
		{"http://pool-a.example", "root", "", false}, // scheme differs
		{"https://pool-a.example", "admin", "", false},
		{"http://127.0.0.1:8080", "admin", "s3cret", true},
		{"https://pool-c.example:443", "root", "c-pass", true}, // bare host matches any scheme/port
		{"https://other.example", "root", "", false},
	} {
		pw, ok, err := credentialsFromFile(p, true, tc.url, tc.user)
		require.NoError(t, err)
		assert.Equal(t, tc.found, ok, tc.url)
		assert.Equal(t, tc.want, pw, tc.url)
	}

	for _, mode := range []os.FileMode{0o644, 0o640, 0o604, 0o660} {
		p := writeCreds(t, body, mode)
		_, _, err := credentialsFromFile(p, true, "https://pool-a.example", "root")
		require.ErrorIs(t, err, errCredentialsMode, "mode %o", mode)
		assert.Contains(t, err.Error(), "chmod 600")
	}

	_, _, err := credentialsFromFile(writeCreds(t, "just-a-url root\n", 0o600), true, "https://x", "root")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "line 1")

	missing := filepath.Join(t.TempDir(), "nope")
	_, ok, err := credentialsFromFile(missing, false, "https://x", "root")
	require.NoError(t, err, "a missing default file is fine")
	assert.False(t, ok)
	_, _, err = credentialsFromFile(missing, true, "https://x", "root")
	require.Error(t, err, "a missing named file is an error")
}

func TestPasswordSources(t *testing.T) {
	isolate(t)
	creds := writeCreds(t, "https://a.example root from-file\n", 0o600)
	src := credSource{env: EnvFromPassword, file: creds, fileGiven: true, label: "source pool"}

	t.Setenv(EnvFromPassword, "from-env")
	pw, err := src.password("https://a.example", "root", &bytes.Buffer{})
	require.NoError(t, err)
	assert.Equal(t, "from-env", pw, "the environment comes first")

	t.Setenv(EnvFromPassword, "")
	pw, err = src.password("https://a.example", "root", &bytes.Buffer{})
	require.NoError(t, err)
	assert.Equal(t, "from-file", pw)

	// Not in the file, no terminal: an error naming the sources.
	_, err = src.password("https://b.example", "root", &bytes.Buffer{})
	require.ErrorIs(t, err, errNoPassword)
	assert.Contains(t, err.Error(), EnvFromPassword)

	// On a terminal: the prompt (on stderr), never echoing the answer.
	stdinIsTerminal = func() bool { return true }
	oldRead := readPassword
	t.Cleanup(func() { readPassword = oldRead })
	var prompted string
	readPassword = func(prompt string, w io.Writer) (string, error) {
		prompted = prompt
		return "typed", nil
	}
	var stderr bytes.Buffer
	pw, err = src.password("https://b.example", "root", &stderr)
	require.NoError(t, err)
	assert.Equal(t, "typed", pw)
	assert.Contains(t, prompted, "root at https://b.example")
	assert.NotContains(t, stderr.String(), "typed")

	readPassword = func(string, io.Writer) (string, error) { return "", errors.New("eof") }
	_, err = src.password("https://b.example", "root", &stderr)
	require.Error(t, err)
}
